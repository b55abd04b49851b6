"""Shared set-up for the benchmarks: models built on the fly, the machine's name, memory probes, subprocess calls."""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "bench"
OUT = BENCH / "out"
APP_SOURCE = ROOT / "{{cookiecutter.app_name}}"
sys.path[:0] = [str(ROOT / "tests"), str(APP_SOURCE)]
sys.dont_write_bytecode = True
PYTHON = sys.executable
# Children never write bytecode (the template folder stays clean) and never reach a network.
CHILD_ENV = {"PYTHONDONTWRITEBYTECODE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
             "HF_MODULES_CACHE": str(OUT / "hf_modules"), "GRADIO_ANALYTICS_ENABLED": "False",
             "TOKENIZERS_PARALLELISM": "false"}


def bench_model(hidden: int = 768, layers: int = 8) -> Path:
    """A ~40M-parameter Llama with the fixture's tokenizer (untrained: speed does not depend on the weights)."""
    import tinymodel

    folder = OUT / f"llama-h{hidden}-l{layers}"
    if not (folder / "model.safetensors").exists():
        tinymodel.build_chat_model(folder, hidden=hidden, layers=layers, steps=0)
    return folder


def endless_model(hidden: int = 768, layers: int = 8, shard_size: Optional[str] = None) -> Path:
    """bench_model whose stop tokens never win under greedy decoding, so a reply runs to max_new_tokens.

    The lm_head rows of eos and ``<|im_end|>`` become the mean of the other rows, so their logit is the mean
    of the other logits: never the largest, whatever the hidden state. The baseline worker also checks that
    its greedy reply holds no stop id.
    """
    import tinymodel

    name = f"endless-h{hidden}-l{layers}" + (f"-s{shard_size}" if shard_size else "")
    folder = OUT / name
    if (folder / "config.json").exists() and (folder / ".endless").exists():
        return folder
    from safetensors.torch import load_file, save_file

    tinymodel.build_chat_model(folder, hidden=hidden, layers=layers, steps=0, shard_size=shard_size)
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    stops = [sp.eos_id(), sp.piece_to_id(tinymodel.IM_END)]
    for path in sorted(folder.glob("*.safetensors")):
        tensors = load_file(str(path))
        if "lm_head.weight" in tensors:
            head = tensors["lm_head.weight"].clone()
            keep = [i for i in range(head.shape[0]) if i not in stops]
            head[stops] = head[keep].mean(dim=0, keepdim=True)
            tensors["lm_head.weight"] = head
            save_file(tensors, str(path), metadata={"format": "pt"})
            break
    (folder / ".endless").write_text(json.dumps({"stop_ids": stops}), encoding="utf-8")
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


def proc_status_kib(field: str) -> int:
    """A VmRSS/VmHWM-style line of /proc/self/status, in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0); ru_maxrss would carry the parent's peak over a fork."""
    Path("/proc/self/clear_refs").write_text("5")


def child_env(extra: Optional[dict] = None) -> dict:
    return {**os.environ, **CHILD_ENV, **(extra or {})}


def run_worker(args: List[str], timeout: float = 600) -> dict:
    """Run bench/worker.py in a fresh interpreter and return the JSON object it prints last."""
    done = subprocess.run([PYTHON, str(BENCH / "worker.py"), *args], env=child_env(), capture_output=True,
                          text=True, timeout=timeout, check=False)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not lines:
        raise RuntimeError(f"worker {args} failed ({done.returncode}):\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    return json.loads(lines[-1])


def write(results: dict, path: Optional[str]) -> None:
    """Print the figures as JSON, and write them to path when one is given."""
    text = json.dumps(results, indent=1, default=str)
    print(text)
    if path:
        Path(path).write_text(text, encoding="utf-8")
