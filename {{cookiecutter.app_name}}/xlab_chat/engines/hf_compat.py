"""Where transformers' API moved between the versions the app's pins admit (4.46 to 5.x)."""

from __future__ import annotations

import transformers
from packaging.version import Version


def dtype_keyword() -> str:
    """transformers renamed torch_dtype to dtype in 4.56; pass the one this version knows."""
    return "dtype" if Version(transformers.__version__) >= Version("4.56") else "torch_dtype"
