"""The GGUF file engine=llamacpp runs: which one, where it is kept, and proof that it is whole and current.

Standard library only. A GGUF made from the model is kept beside the model folder (``model`` →
``model-gguf/``) with a stamp: the files it was made from (name, size, modification time), the type,
the converter's version, and the GGUF's size and SHA-256. Every start checks all of them, so a
half-written, corrupted or outdated file is never run: it is made again. A model repo that already holds
a ``.gguf`` is run as it is.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, List, Optional

# QUANTIZE's meaning for llama.cpp: auto is the field's usual 4-bit type, int8 its 8-bit one, and none
# keeps the weights' own float type (bfloat16, float16 or float32).
GGUF_TYPES = {"auto": "Q4_K_M", "int8": "Q8_0", "none": "float"}
CONVERTER_VERSION = 1  # raise when engines/gguf_convert.py writes different files
SOURCE_PATTERNS = ("config.json", "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "*.safetensors", "pytorch_model*.bin")


def gguf_type(quantize: str) -> str:
    return GGUF_TYPES.get(quantize, GGUF_TYPES["auto"])


def cache_folder(model_folder: Path) -> Path:
    return model_folder.parent / f"{model_folder.name}-gguf"


def cached_path(model_folder: Path, kind: str) -> Path:
    return cache_folder(model_folder) / f"model-{kind}.gguf"


def stamp_path(gguf: Path) -> Path:
    return gguf.with_name(gguf.name + ".json")


def repo_gguf(model_folder: Path, kind: str) -> Optional[Path]:
    """A .gguf the model repo ships: the one named for the wanted type (e.g. …q4_k_m.gguf), else the only one,
    else the first by name."""
    found: List[Path] = sorted(p for p in model_folder.glob("*.gguf") if p.is_file())
    named = [p for p in found if kind.lower() in p.name.lower().replace("-", "_")]
    return (named or found or [None])[0]


def source_files(model_folder: Path) -> Dict[str, List[int]]:
    """What the GGUF is made from, as {name: [size, mtime_ns]}: a new download or a changed file differs."""
    files: Dict[str, List[int]] = {}
    for pattern in SOURCE_PATTERNS:
        for path in model_folder.glob(pattern):
            info = path.stat()
            files[path.name] = [info.st_size, info.st_mtime_ns]
    return dict(sorted(files.items()))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(4 * 1024 * 1024), b""):
            digest.update(block)
    return digest.hexdigest()


def stamp(model_folder: Path, gguf: Path, kind: str) -> dict:
    return {"source": source_files(model_folder), "type": kind, "converter": CONVERTER_VERSION,
            "size": gguf.stat().st_size, "sha256": sha256(gguf)}


def why_not_current(model_folder: Path, gguf: Path, kind: str) -> str:
    """"" when gguf was made from model_folder as it is now, whole and unchanged; else why not, in words."""
    if not gguf.is_file():
        return "not made yet"
    try:
        recorded = json.loads(stamp_path(gguf).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "its stamp is missing (an interrupted conversion)"
    if recorded.get("type") != kind or recorded.get("converter") != CONVERTER_VERSION:
        return "it was made by another type or converter"
    if recorded.get("source") != source_files(model_folder):
        return "the model changed since it was made"
    if recorded.get("size") != gguf.stat().st_size or recorded.get("sha256") != sha256(gguf):
        return "its bytes differ from those recorded (corrupted or cut short)"
    return ""


def record(model_folder: Path, gguf: Path, kind: str) -> None:
    """Write the stamp atomically, after the GGUF itself is in place."""
    target = stamp_path(gguf)
    partial = target.with_name(target.name + ".partial")
    partial.write_text(json.dumps(stamp(model_folder, gguf, kind), indent=1), encoding="utf-8")
    os.replace(partial, target)


def forget(gguf: Path) -> None:
    """Remove a GGUF that failed its check, its stamp, and what an interrupted conversion left behind."""
    for path in [gguf, stamp_path(gguf), *gguf.parent.glob(gguf.name + ".partial*")]:
        path.unlink(missing_ok=True)
