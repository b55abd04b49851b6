"""Streamed tokens/s through the app's engine ÷ plain ``model.generate`` tokens/s, side by side.

Same model, prompt, greedy decoding and token count; runs alternate so machine noise hits both.
Usage: .venv/bin/python bench/stream_efficiency.py [--tokens 128] [--runs 5]
"""

from __future__ import annotations

import argparse
import json
import queue

from common import bench_model, clock, machine, median

GOAL = 0.97


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    import torch
    from xlab_chat.engines.transformers_engine import Engine, Generation

    torch.manual_seed(0)
    engine = Engine.load(bench_model(), "cpu", "float32")
    # Stop only on an id the model cannot produce, so both paths emit exactly --tokens tokens.
    engine.stop_ids = [len(engine.tokenizer) + 1000]
    ids, _ = engine.fit_prompt("", [], "Hello, how are you?", args.tokens)
    prompt = torch.tensor([ids])

    def plain() -> float:
        started = clock()
        with torch.inference_mode():
            out = engine.model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=args.tokens,
                                        min_new_tokens=args.tokens, do_sample=False, pad_token_id=0)
        assert out.shape[1] - prompt.shape[1] == args.tokens
        return args.tokens / (clock() - started)

    def streamed() -> float:
        inbox: queue.Queue = queue.Queue()
        started = clock()
        generation = engine.start(ids, inbox.put, args.tokens, 0.0, 1.0, 1.0)
        while (item := inbox.get()) is not Generation.DONE:
            assert not isinstance(item, Exception), item
        elapsed = clock() - started
        generation.finished.wait()
        return args.tokens / elapsed

    def plain_on_worker() -> float:
        """The baseline runs on the engine's own worker thread, as the app's generations do."""
        return engine.workers.submit(plain).result()

    plain_on_worker(), streamed()  # warm-up
    plain_rates, stream_rates = [], []
    for _ in range(args.runs):
        plain_rates.append(plain_on_worker())
        stream_rates.append(streamed())
    ratio = median([s / p for s, p in zip(stream_rates, plain_rates)])
    params = sum(p.numel() for p in engine.model.parameters()) / 1e6
    print(f"machine: {machine()}; model: {params:.0f}M params, fp32, CPU; {args.tokens} tokens, {args.runs} runs")
    print(f"plain generate: {median(plain_rates):.1f} tok/s; engine stream: {median(stream_rates):.1f} tok/s")
    print(f"stream efficiency (median of per-run ratios): {ratio:.3f}  goal >= {GOAL}: "
          f"{'PASS' if ratio >= GOAL else 'FAIL'}")
    if args.json:
        record = {"engine_stream": ratio, "plain_tok_s": median(plain_rates), "stream_tok_s": median(stream_rates),
                  "tokens": args.tokens, "runs": args.runs, "params": params * 1e6}
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(record, handle)


if __name__ == "__main__":
    main()
