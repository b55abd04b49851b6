"""engine=llamacpp against llama.cpp itself: the app at Q4_K_M and Q8_0 over HTTP, beside llama-cpp-python's own
generate loop on the very same GGUF files (the anchors), 2 threads.

    .venv/bin/python bench/llamacpp_bench.py [--runs 3] [--tokens 128] [--prefill 1000] [--keep-gguf] [--json FILE]

The model is internlm2-chat-1_8b-shaped (vocab 92544, hidden 2048, 24 layers, 16 heads, 8 kv heads, intermediate
8192: 1.89B parameters), random bf16 weights written shard by shard, with the fixture's small tokenizer. Its output
rows for every id but the tokenizer's plain pieces are the mean of those pieces' rows, so greedy decoding never
stops and every token is visible text (speed does not depend on the weights).

Each app converts the model on its first start (timed from its log; --keep-gguf keeps earlier files). Then, in
each round, alternating: a fresh interpreter runs the anchor (load, decode --tokens after a short prompt, first
token after --prefill tokens), and the app of the same type answers the same over HTTP (its page's updates as the
browser reads them). Each prompt starts with another word, so no prefix cache helps. Figures are medians.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import time
from pathlib import Path

from common import OUT, PYTHON, child_env, machine, median, write
from int8_cpu import BANDWIDTH, child  # the copy-bandwidth probe and its 2-thread child runner
from sse_reader import QueueReader

FOLDER = OUT / "internlm2-1_8b-bf16"
SHAPE = dict(vocab_size=92544, hidden=2048, layers=24, heads=16, kv_heads=8, intermediate=8192)
TYPES = {"Q4_K_M": "auto", "Q8_0": "int8"}  # GGUF type: the app's QUANTIZE
WORDS = ["apple", "river", "stone", "cloud", "music", "paper", "green", "light", "table", "water"]

ANCHOR = r"""
import json, sys, time
from llama_cpp import Llama

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

path, new, prefill, word = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
start = time.perf_counter()
llm = Llama(path, n_threads=2, n_threads_batch=2, n_ctx=4096, use_mlock=False, logits_all=False, verbose=False)
load_s = time.perf_counter() - start

def run(tokens, count):
    start, stamps = time.perf_counter(), []
    for _ in llm.generate(tokens, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
        stamps.append(time.perf_counter())
        if len(stamps) == count:
            break
    return start, stamps

chat = "<|im_start|>user\n{} hello<|im_end|>\n<|im_start|>assistant\n"
run(llm.tokenize(chat.format(word).encode(), special=True), 2)  # warm-up
start, stamps = run(llm.tokenize(chat.format(word + " " + word).encode(), special=True), new)
decode = (len(stamps) - 1) / (stamps[-1] - stamps[0])
body = llm.tokenize((word + " la" * prefill).encode())[:prefill]
start, stamps = run(body, 1)
print(json.dumps({"decode_tok_s": decode, "first_token_s": stamps[0] - start, "prompt_tokens": len(body),
                  "load_s": load_s, "peak_rss": status("VmHWM")}))
"""

def build() -> Path:
    """The checkpoint, once: random bf16 InternLM2 weights in 6 shards, made tensor by tensor (peak ~1 GB)."""
    import sentencepiece as spm
    import torch
    from internlm2_fixture import _internlm2_config, _write_tokenizer
    from safetensors.torch import save_file

    if (FOLDER / ".complete").exists():
        return FOLDER
    shutil.rmtree(FOLDER, ignore_errors=True)
    FOLDER.mkdir(parents=True)
    _write_tokenizer(FOLDER)
    config = _internlm2_config(SHAPE["vocab_size"], SHAPE["hidden"], SHAPE["layers"], SHAPE["heads"],
                               SHAPE["kv_heads"], SHAPE["intermediate"], 32768, 1e6, None, False, "bfloat16")
    (FOLDER / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generator = torch.Generator().manual_seed(0)
    hidden, inter = SHAPE["hidden"], SHAPE["intermediate"]
    qkv_rows = (SHAPE["heads"] + 2 * SHAPE["kv_heads"]) * hidden // SHAPE["heads"]

    def normal(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=generator) / shape[-1] ** 0.5).to(torch.bfloat16)

    sp = spm.SentencePieceProcessor(model_file=str(FOLDER / "tokenizer.model"))
    plain = [i for i in range(sp.get_piece_size()) if not (sp.is_byte(i) or sp.is_control(i) or sp.is_unknown(i)
                                                           or sp.id_to_piece(i).startswith("<|"))]
    output = normal(SHAPE["vocab_size"], hidden)
    output[:] = output[plain].float().mean(dim=0).to(torch.bfloat16)  # every other id: the mean of the plain ones
    output[plain] = normal(len(plain), hidden)
    shards = [{"model.tok_embeddings.weight": normal(SHAPE["vocab_size"], hidden) * hidden ** 0.5,
               "output.weight": output, "model.norm.weight": torch.ones(hidden, dtype=torch.bfloat16)}]
    for layer in range(SHAPE["layers"]):
        if layer % 5 == 0:
            shards.append({})
        prefix = f"model.layers.{layer}."
        shards[-1].update({prefix + "attention.wqkv.weight": normal(qkv_rows, hidden),
                           prefix + "attention.wo.weight": normal(hidden, hidden),
                           prefix + "feed_forward.w1.weight": normal(inter, hidden),
                           prefix + "feed_forward.w3.weight": normal(inter, hidden),
                           prefix + "feed_forward.w2.weight": normal(hidden, inter),
                           prefix + "attention_norm.weight": torch.ones(hidden, dtype=torch.bfloat16),
                           prefix + "ffn_norm.weight": torch.ones(hidden, dtype=torch.bfloat16)})
    weight_map = {}
    for index, tensors in enumerate(shards, start=1):
        name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(tensors, str(FOLDER / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
    (FOLDER / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (FOLDER / ".complete").write_text("")
    return FOLDER


def weights_per_token(path: Path) -> int:
    """Bytes a decoding step reads: every tensor but the token embedding (one row of it is looked up)."""
    import gguf

    return sum(int(t.n_bytes) for t in gguf.GGUFReader(str(path)).tensors if t.name != "token_embd.weight")


def start_app(kind: str, work: Path) -> dict:
    """Render and start the app for one GGUF type; wait until ready; the conversion time from its log."""
    from apprunner import AppProcess, render

    folder = render(work / kind, model_repo=str(FOLDER), engine="llamacpp", hardware="cpu", ui_language="en",
                    validate_model_repo=False)
    started = time.monotonic()
    app = AppProcess(folder, {**child_env(), "MODEL_PATH": str(FOLDER), "QUANTIZE": TYPES[kind],
                              "CONCURRENCY_LIMIT": "4", "ENGINE_START_TIMEOUT": "3600"}, work / f"{kind}.log",
                     python=PYTHON)
    app.wait_stage(("ready",), timeout=3600)
    made = re.search(rf"made model-{kind}\.gguf \(([\d.]+) GB\) in (\d+) s", app.log)
    import psutil

    server = next(p for p in psutil.Process(app.process.pid).children(recursive=True)
                  if p.cmdline()[1:3] == ["-m", "llama_cpp.server"])  # the server, not its guard
    return {"app": app, "ready_s": time.monotonic() - started, "server": server,
            "convert_s": float(made.group(2)) if made else None, "gguf_gb": float(made.group(1)) if made else None}


def filler(count: int) -> str:
    """" la" repeated to exactly count tokens of the model's tokenizer (after the first word)."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(FOLDER / "tokenizer.model"))
    text = " la" * count
    while len(sp.encode("apple" + text)) - len(sp.encode("apple")) > count:
        text = text[:-3]
    return text


def app_round(reader: QueueReader, tokens: int, prefill_text: str, word: str) -> dict:
    reader.call(f"{word} hi", "", 2, 0.0, 0.8, 1.0)  # the page and the server warm, and no shared prefix below
    got = reader.call(f"{word} {word} hello", "", tokens, 0.0, 0.8, 1.0)
    decode = (tokens - 1) / max(got["elapsed"] - got["first"], 1e-9)
    first = reader.call(word + prefill_text, "", 1, 0.0, 0.8, 1.0)["first"]
    return {"decode_tok_s": decode, "first_token_s": first}


def measure(runs: int, tokens: int, prefill: int, keep_gguf: bool) -> dict:
    model = build()
    cache = model.parent / f"{model.name}-gguf"
    if not keep_gguf:
        shutil.rmtree(cache, ignore_errors=True)
    work = OUT / "llamacpp-app"
    shutil.rmtree(work, ignore_errors=True)
    apps = {}
    try:
        for kind in TYPES:  # one after the other: each conversion has the machine to itself
            apps[kind] = start_app(kind, work)
        readers = {kind: QueueReader(info["app"].url, "/chat") for kind, info in apps.items()}
        prefill_text = filler(prefill - 12)  # with the chat template's tokens, --prefill in all
        rows = {f"{side} {kind}": [] for kind in TYPES for side in ("direct", "app")}
        for run in range(runs):
            word = WORDS[run % len(WORDS)]
            for kind in (TYPES if run % 2 == 0 else reversed(list(TYPES))):
                for side in (("direct", "app") if run % 2 == 0 else ("app", "direct")):
                    time.sleep(0.5)
                    rows[f"{side} {kind}"].append(
                        child(ANCHOR, str(cache / f"model-{kind}.gguf"), str(tokens), str(prefill), word)
                        if side == "direct" else app_round(readers[kind], tokens, prefill_text, word))
        bandwidth = child(BANDWIDTH)["copy_bytes_per_s"]
        result = {"machine": machine(), "cpu_flags": cpu_flags(), "runs": runs, "tokens": tokens, "prefill": prefill,
                  "copy_GB_s": bandwidth / 1e9, "variants": {}}
        for name, values in rows.items():
            kind = name.split()[1]
            decode = median([v["decode_tok_s"] for v in values])
            row = {"decode_tok_s": decode, "first_token_s": median([v["first_token_s"] for v in values]),
                   "weights_read_over_copy": weights_per_token(cache / f"model-{kind}.gguf") * decode / bandwidth}
            if name.startswith("direct"):
                row["rss_GB"] = median([v["peak_rss"] for v in values]) / 1e9
            else:
                row.update(rss_GB=apps[kind]["server"].memory_info().rss / 1e9, convert_s=apps[kind]["convert_s"],
                           gguf_GB=apps[kind]["gguf_gb"], ready_s=apps[kind]["ready_s"])
            result["variants"][name] = row
        for kind in TYPES:
            result[f"app_over_direct_{kind}"] = median([a["decode_tok_s"] / d["decode_tok_s"] for a, d in
                                                        zip(rows[f"app {kind}"], rows[f"direct {kind}"])])
        return result
    finally:
        for info in apps.values():
            info["app"].stop()


def cpu_flags() -> str:
    flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    return " ".join(f for f in flags.split() if f.startswith(("avx", "amx", "fma", "f16c")))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--prefill", type=int, default=1000)
    parser.add_argument("--keep-gguf", action="store_true")
    parser.add_argument("--json")
    args = parser.parse_args()
    write(measure(args.runs, args.tokens, args.prefill, args.keep_gguf), args.json)


if __name__ == "__main__":
    main()
