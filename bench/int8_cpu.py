"""int8 weights on the CPU against bfloat16 and float32, through the app's own native loader.

    .venv/bin/python bench/int8_cpu.py [--rounds 3] [--json FILE]

The model is InternLM2-shaped (vocab 92544, hidden 1024, 24 layers, 16 heads, 8 kv heads, intermediate 4096:
about 565M parameters, bf16 in 4 shards), random weights (speed does not depend on them). Each variant loads in a
fresh interpreter with 2 threads: `load_internlm2_as_llama` (int8 quantised shard by shard), then greedy decoding
of 32 tokens after a 64-token prompt. Variants alternate within each round; figures are medians.

Figures: int8 ÷ bf16 and int8 ÷ fp32 decode tokens/s; achieved weight bytes/s (bytes read per token × tokens/s) ÷
this machine's copy bandwidth measured in the same run; int8's peak RSS while loading ÷ (the int8 model's weights as
held in memory, int8 Linears plus the bf16 embeddings, + one shard); beside it the same over the int8 Linears alone.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from common import CHILD_ENV, OUT, PYTHON, machine  # common also puts the app and tests on sys.path

FOLDER = OUT / "internlm2-565m-bf16"
SHAPE = dict(vocab_size=92544, hidden=1024, layers=24, heads=16, kv_heads=8, intermediate=4096)
PROMPT, NEW = 64, 32
VARIANTS = ("fp32", "bf16", "int8")

WORKER = r"""
import json, os, sys, time
import torch
torch.set_num_threads(2)
sys.path.insert(0, sys.argv[2])
from xlab_chat.engines import int8
from xlab_chat.engines.internlm2 import load_internlm2_as_llama
from xlab_chat.engines.transformers_engine import choose_placement

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024
variant, folder = sys.argv[1], sys.argv[3]
before = status("VmRSS")
dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": choose_placement("cpu", "auto", "int8").dtype}[variant]
start = time.perf_counter()
model = load_internlm2_as_llama(folder, dtype, quantize_int8=variant == "int8")
load_s = time.perf_counter() - start
kernels = int8.use_fastest_kernels_(model, dtype)[0].label if variant == "int8" else ""
peak = status("VmHWM") - before
weight_bytes = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
weight_bytes += int8.int8_weight_bytes(model)  # what decoding reads per token (one embedding row aside)
resident = weight_bytes + sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" in n)
prompt = torch.randint(3, 92000, (1, int(sys.argv[4])), generator=torch.Generator().manual_seed(0))
new = int(sys.argv[5])
with torch.inference_mode():
    model.generate(prompt, max_new_tokens=2, min_new_tokens=2, do_sample=False, pad_token_id=2)  # warm-up
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=2)
    first = time.perf_counter() - start
    start = time.perf_counter()
    model.generate(prompt, max_new_tokens=new + 1, min_new_tokens=new + 1, do_sample=False, pad_token_id=2)
    total = time.perf_counter() - start
print(json.dumps({"variant": variant, "backend": kernels,
                  "tok_s": new / max(total - first, 1e-9), "load_s": load_s, "load_peak_bytes": peak,
                  "weight_bytes_per_token": weight_bytes, "resident_weight_bytes": resident}))
"""

BANDWIDTH = r"""
import json, time, torch
torch.set_num_threads(2)
a = torch.empty(512 * 2**20, dtype=torch.uint8).fill_(1)
b = torch.empty_like(a)
runs = []
for _ in range(5):
    start = time.perf_counter(); b.copy_(a); runs.append(time.perf_counter() - start)
runs.sort()
print(json.dumps({"copy_bytes_per_s": 2 * a.numel() / runs[len(runs) // 2]}))
"""


def build(folder: Path = FOLDER, shape: dict = SHAPE, shards: int = 4) -> Path:
    """The checkpoint, once: bf16 InternLM2 weights in shards, its config and a (small) InternLM2 tokenizer."""
    from internlm2_fixture import _internlm2_config, _write_tokenizer, _write_weights, internlm2_weights

    if not (folder / "tokenizer.model").exists():
        folder.mkdir(parents=True, exist_ok=True)
        _write_tokenizer(folder)  # the app's start checks the repo is complete; the ids it makes fit any vocab
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    config = _internlm2_config(shape["vocab_size"], shape["hidden"], shape["layers"], shape["heads"],
                               shape["kv_heads"], shape["intermediate"], 4096, 1e6, None, False, "bfloat16")
    weights = internlm2_weights(config)
    for name in list(weights):  # one tensor at a time: the float32 and bfloat16 copies never coexist whole
        weights[name] = weights[name].to(torch.bfloat16)
    _write_weights(folder, weights, "safetensors", shards)
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


def child(code: str, *args: str) -> dict:
    done = subprocess.run([PYTHON, "-c", code, *args], capture_output=True, text=True, timeout=1200,
                          env={**os.environ, **CHILD_ENV, "OMP_NUM_THREADS": "2"})
    if done.returncode != 0:
        raise RuntimeError(done.stderr[-3000:])
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    folder = build()
    app = str(Path(__file__).resolve().parents[1] / "{{cookiecutter.app_name}}")
    shard = max(p.stat().st_size for p in folder.glob("model-*.safetensors"))
    runs = {name: [] for name in VARIANTS}
    bandwidth = []
    for round_ in range(args.rounds):
        order = VARIANTS if round_ % 2 == 0 else tuple(reversed(VARIANTS))
        for name in order:
            runs[name].append(child(WORKER, name, app, str(folder), str(PROMPT), str(NEW)))
            time.sleep(0.5)
        bandwidth.append(child(BANDWIDTH)["copy_bytes_per_s"])
    tok = {name: statistics.median(r["tok_s"] for r in runs[name]) for name in VARIANTS}
    q8 = runs["int8"]
    achieved = statistics.median(r["weight_bytes_per_token"] * r["tok_s"] for r in q8)
    copy = statistics.median(bandwidth)
    int8_bytes = q8[0]["weight_bytes_per_token"]
    peak = statistics.median(r["load_peak_bytes"] for r in q8)
    result = {
        "machine": machine(), "backend": q8[0]["backend"], "rounds": args.rounds,
        "tok_s": {name: round(value, 2) for name, value in tok.items()},
        "tok_s_runs": {name: [round(r["tok_s"], 2) for r in runs[name]] for name in VARIANTS},
        "int8_over_bf16": round(tok["int8"] / tok["bf16"], 2), "int8_over_fp32": round(tok["int8"] / tok["fp32"], 2),
        "copy_gb_s": round(copy / 1e9, 1), "int8_achieved_gb_s": round(achieved / 1e9, 1),
        "bandwidth_ratio": round(achieved / copy, 2),
        "load_peak_over_int8_plus_shard": round(peak / (q8[0]["resident_weight_bytes"] + shard), 2),
        "load_peak_over_linears_plus_shard": round(peak / (int8_bytes + shard), 2),
        "int8_model_mb": round(q8[0]["resident_weight_bytes"] / 2**20), "shard_mb": round(shard / 2**20),
        "load_peak_mb": {name: round(statistics.median(r["load_peak_bytes"] for r in runs[name]) / 2**20)
                         for name in VARIANTS},
    }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
