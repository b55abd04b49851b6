"""Which of a repo's LFS files the app's loaders read, so the download fetches those and no others. Stdlib only.

Hub repos often hold one model several times: CLIP's openai repo has ``pytorch_model.bin`` and
``model.safetensors`` beside TensorFlow (``tf_model.h5``) and Flax (``flax_model.msgpack``) copies, and many chat
repos carry both ``.bin`` and ``.safetensors`` shards. transformers, the native loader and the adapter reader all
take safetensors when a folder has them, so each folder keeps one format, and other frameworks' files go.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Dict, List, Sequence

OTHER_FRAMEWORKS = (".h5", ".msgpack", ".onnx", ".onnx_data", ".ot", ".tflite", ".mlmodel", ".mlpackage")
OTHER_FOLDERS = ("onnx", "openvino", "coreml", "tflite")
TORCH_WEIGHTS = (".bin", ".pt", ".pth")


def _is_weights(name: str, suffixes: Sequence[str]) -> bool:
    stem = PurePosixPath(name).name
    return stem.endswith(suffixes) and not stem.startswith(("training_args", "optimizer", "scheduler", "rng_state"))


def loader_files(lfs_names: Sequence[str]) -> List[str]:
    """The LFS files to download, in the given order: other frameworks' copies dropped, and in a folder that has
    safetensors weights its torch pickles (``pytorch_model*.bin``, ``adapter_model.bin``) dropped too."""
    with_safetensors: Dict[str, bool] = {}
    for name in lfs_names:
        if name.endswith(".safetensors"):
            with_safetensors[str(PurePosixPath(name).parent)] = True
    keep = []
    for name in lfs_names:
        path = PurePosixPath(name)
        if name.endswith(OTHER_FRAMEWORKS) or (path.parts and path.parts[0] in OTHER_FOLDERS):
            continue
        if _is_weights(name, TORCH_WEIGHTS) and with_safetensors.get(str(path.parent)):
            continue
        keep.append(name)
    return keep
