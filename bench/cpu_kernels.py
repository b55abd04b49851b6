"""The CPU's int8 kernels on a 1.8B model: the app's choice by timing against each kernel and the unquantised app.

    nice -n 10 .venv/bin/python bench/cpu_kernels.py [--rounds 2] [--json FILE]

The model is internlm2-chat-1_8b-shaped (vocab 92544, hidden 2048, 24 layers, 16 heads, 8 kv heads, intermediate
8192: 1.89B parameters, bf16 in 8 shards), random weights (speed does not depend on them). Each variant starts
in a fresh interpreter with 2 threads through the app's own ``Engine.load``; variants alternate within each round,
figures are medians:

- ``none``: QUANTIZE=none, the dtype the app picks on this CPU (bf16 with AVX-512 BF16 or AMX, else fp32);
- ``fp32``: DTYPE=float32, QUANTIZE=none;
- ``auto``: QUANTIZE=auto, the kernels chosen by timing at engine start (its log line is kept);
- one variant per kernel, forced for both phases after the same load (``int8pack-fp32`` decodes only: its
  many-row path is a scalar loop, so the prompt runs on the float matmul).

Figures: decode tokens/s (128 greedy tokens after a 16-token prompt), first token after a 1000-token prompt,
weight bytes read per token × tokens/s ÷ this machine's copy bandwidth (measured in the same run), RSS after
generating.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from common import OUT, machine
from int8_cpu import BANDWIDTH, build, child

FOLDER = OUT / "internlm2-1_8b-bf16"
SHAPE = dict(vocab_size=92544, hidden=2048, layers=24, heads=16, kv_heads=8, intermediate=8192)
SHORT, LONG, NEW = 16, 1000, 128
FORCED = {"fbgemm": ("fbgemm", "fbgemm"), "int8pack": ("int8pack", "int8pack"),
          "per-token": ("per-token", "per-token"), "int8pack-fp32": ("int8pack-fp32", "float")}
VARIANTS = ("none", "fp32", "auto", *FORCED)

WORKER = r"""
import contextlib, io, json, sys, time
from pathlib import Path
import torch
torch.set_num_threads(2)
sys.path.insert(0, sys.argv[2])
from xlab_chat.engines import int8
from xlab_chat.engines.transformers_engine import Engine

variant, folder, forced = sys.argv[1], Path(sys.argv[3]), json.loads(sys.argv[4])
short, long, new = (int(a) for a in sys.argv[5:8])
dtype, quantize = {"none": ("auto", "none"), "fp32": ("float32", "none")}.get(variant, ("auto", "int8"))
start = time.perf_counter()
with contextlib.redirect_stdout(io.StringIO()) as log:
    engine = Engine.load(folder, "cpu", dtype, quantize=quantize)
load_s = time.perf_counter() - start
model = engine.model
if forced:
    int8.use_kernels_(model, *forced)
floats = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed" not in n)
read = floats + int8.int8_weight_bytes(model)  # what one decode step reads (one embedding row aside)

def ids(n):
    return torch.randint(3, 92000, (1, n), generator=torch.Generator().manual_seed(n))

def generate(prompt, tokens):
    start = time.perf_counter()
    model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=tokens, min_new_tokens=tokens,
                   do_sample=False, pad_token_id=2)
    return time.perf_counter() - start

with torch.inference_mode():
    generate(ids(short), 2)  # warm-up
    first_short = generate(ids(short), 1)
    decode = new / max(generate(ids(short), new + 1) - first_short, 1e-9)
    first_long = generate(ids(long), 1)
rss = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmRSS"))
print(json.dumps({"variant": variant, "label": engine.placement.label, "load_s": load_s, "decode_tok_s": decode,
                  "first_token_s": first_long, "read_bytes_per_token": read, "rss_bytes": rss,
                  "log": log.getvalue().strip()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    variants = args.variants.split(",")
    folder = build(FOLDER, SHAPE, 8)
    app = str(Path(__file__).resolve().parents[1] / "{{cookiecutter.app_name}}")
    runs: dict = {name: [] for name in variants}
    bandwidth = []
    for round_ in range(args.rounds):
        for name in variants if round_ % 2 == 0 else reversed(variants):
            forced = json.dumps(FORCED.get(name))
            runs[name].append(child(WORKER, name, app, str(folder), forced, str(SHORT), str(LONG), str(NEW)))
            print(json.dumps(runs[name][-1]), flush=True)
            time.sleep(0.5)
        bandwidth.append(child(BANDWIDTH)["copy_bytes_per_s"])
    copy = statistics.median(bandwidth)

    def med(name: str, key: str) -> float:
        return statistics.median(r[key] for r in runs[name])

    result = {"machine": machine(), "rounds": args.rounds, "copy_gb_s": round(copy / 1e9, 1), "variants": {}}
    for name in variants:
        result["variants"][name] = {
            "label": runs[name][0]["label"],
            "logs": [r["log"] for r in runs[name] if r["log"]],
            "decode_tok_s": round(med(name, "decode_tok_s"), 2),
            "first_token_s": round(med(name, "first_token_s"), 1),
            "read_over_copy": round(statistics.median(r["read_bytes_per_token"] * r["decode_tok_s"]
                                                      for r in runs[name]) / copy, 2),
            "rss_gb": round(med(name, "rss_bytes") / 1e9, 2),
            "runs": [{key: round(r[key], 2) for key in ("decode_tok_s", "first_token_s")} for r in runs[name]],
        }
    print(json.dumps(result, indent=1))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
