"""``python -m xlab_chat check``: the model repo check, without downloading the weights."""

from __future__ import annotations

import sys

from .model.check import cli

if __name__ == "__main__":
    sys.exit(cli(sys.argv[1:]))
