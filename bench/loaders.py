"""InternLM2 loaded natively (as transformers' Llama) ÷ through the checkpoint's own remote code.

The same checkpoint (tests/internlm2_fixture, ~19M parameters, ~76 MB fp32, with the fixture's separately
written InternLM2 forward pass as its remote code). Each load runs in a fresh interpreter, native and remote
alternating: load time (after the imports) and load + first token (transformers maps safetensors lazily, so its
load alone reads little), peak RSS during the load and through the first tokens (VmHWM reset via
/proc/self/clear_refs) and greedy tokens/s on the CPU.

Usage: .venv/bin/python bench/loaders.py [--runs 3] [--tokens 64]
"""

from __future__ import annotations

import argparse

from common import OUT, median, run_worker, write

SHAPE = {"hidden": 512, "layers": 8, "heads": 8, "kv_heads": 2, "max_position_embeddings": 2048}


def checkpoint():
    import internlm2_fixture

    folder = OUT / "internlm2-h512-l8"
    if not (folder / "modeling_internlm2.py").exists():
        internlm2_fixture.build_internlm2(folder, **SHAPE)
    return folder


def measure(runs: int = 3, tokens: int = 64) -> dict:
    folder = checkpoint()
    native, remote = [], []
    for _ in range(runs):
        native.append(run_worker(["loader", "native", str(folder), str(tokens)]))
        remote.append(run_worker(["loader", "remote", str(folder), str(tokens)]))

    def ratio(key: str) -> float:
        return median([n[key] / r[key] for n, r in zip(native, remote)])

    agree = 0
    for a, b in zip(native[0]["ids"], remote[0]["ids"]):
        if a != b:
            break
        agree += 1
    return {
        "weight_bytes": native[0]["weight_bytes"], "tokens": tokens, "runs": runs,
        "native_load_s": median([n["load_s"] for n in native]), "remote_load_s": median([r["load_s"] for r in remote]),
        "load_time": ratio("load_s"),
        "native_ready_s": median([n["ready_s"] for n in native]),
        "remote_ready_s": median([r["ready_s"] for r in remote]),
        "ready_time": ratio("ready_s"),
        "native_peak_rss": median([n["peak_rss"] for n in native]),
        "remote_peak_rss": median([r["peak_rss"] for r in remote]),
        "peak_rss_ratio": ratio("peak_rss"),
        "native_serving_peak_rss": median([n["serving_peak_rss"] for n in native]),
        "remote_serving_peak_rss": median([r["serving_peak_rss"] for r in remote]),
        "serving_peak_rss_ratio": ratio("serving_peak_rss"),
        "native_peak_over_weights": median([(n["peak_rss"] - n["baseline_rss"]) / n["weight_bytes"] for n in native]),
        "remote_peak_over_weights": median([(r["peak_rss"] - r["baseline_rss"]) / r["weight_bytes"] for r in remote]),
        "native_tok_s": median([n["tokens_per_s"] for n in native]),
        "remote_tok_s": median([r["tokens_per_s"] for r in remote]),
        "tokens_per_s": ratio("tokens_per_s"),
        "greedy_tokens_agree": f"{agree}/{tokens}",
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    write(measure(args.runs, args.tokens), args.json)


if __name__ == "__main__":
    main()
