"""Shared set-up for the benchmarks: the fixture's model builder at a size where compute dominates."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "bench" / "out"
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "{{cookiecutter.app_name}}")]
sys.dont_write_bytecode = True


def bench_model(hidden: int = 768, layers: int = 8) -> Path:
    """A ~40M-parameter Llama with the fixture's tokenizer (untrained: speed does not depend on the weights)."""
    import tinymodel

    folder = OUT / f"llama-h{hidden}-l{layers}"
    if not (folder / "model.safetensors").exists():
        tinymodel.build_chat_model(folder, hidden=hidden, layers=layers, steps=0)
    return folder


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{os.cpu_count()} cores, {cpu}, Python {platform.python_version()}"


def median(values: list) -> float:
    return statistics.median(values)


def clock() -> float:
    return time.perf_counter()
