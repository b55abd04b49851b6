"""Read a safetensors file into tensors the caller owns: the native loader's shards and a LoRA adapter's weights.

Its own module so that engines/internlm2.py and engines/lora.py both use it without importing each other.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict

import torch

REMOTE_CODE_HINT = "set loader=remote-code to run the repo's own modelling code instead"
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}


def read_safetensors(path: Path) -> Dict[str, torch.Tensor]:
    """Read each tensor straight into memory the model will own.

    A memory map would keep the file's pages resident beside the copies made from it, doubling the peak.
    """
    tensors: Dict[str, torch.Tensor] = {}
    with open(path, "rb") as handle:
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        except (struct.error, ValueError, MemoryError, OverflowError):
            raise ValueError(f"{path.name} is not a readable safetensors file; delete the model folder and "
                             "download it again.") from None
        header.pop("__metadata__", None)
        start = 8 + length
        for name, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            stored = _SAFETENSORS_DTYPES.get(info["dtype"])
            if stored is None:
                raise ValueError(f"{path.name}: tensor {name!r} has dtype {info['dtype']}, which the native "
                                 f"loader does not read; {REMOTE_CODE_HINT}.")
            begin, end = info["data_offsets"]
            raw = torch.empty(end - begin, dtype=torch.uint8)
            handle.seek(start + begin)
            if handle.readinto(raw.numpy()) != end - begin:
                raise ValueError(f"{path.name} is truncated; delete the model folder and download it again.")
            tensors[name] = raw.view(stored).reshape(info["shape"])
    return tensors
