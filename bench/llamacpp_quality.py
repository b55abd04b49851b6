"""What engine=llamacpp's GGUF types cost in quality, against the float32 model in transformers.

    .venv/bin/python bench/llamacpp_quality.py [--hidden 256] [--json FILE]

The model is the tests' trained chat model (tests/tinymodel.py) made --hidden wide (256 by default: llama.cpp's
4-bit K-quants work on rows of 256, so narrower rows would fall back to other types). The app's converter and
llama.cpp's quantizer make F32 (a control: it must agree with transformers), Q8_0 and Q4_K_M files. For each:
perplexity on the model's own chats, divided by float32's, and greedy agreement (the share of the first 32
greedy tokens equal to float32's, over every chat prompt and a long story).
"""

from __future__ import annotations

import argparse
import math
import shutil
from pathlib import Path

from common import OUT, write

TYPES = ("F32", "Q8_0", "Q4_K_M")
NEW_TOKENS = 32


def model(hidden: int) -> Path:
    import tinymodel

    folder = OUT / f"trained-h{hidden}"
    if not (folder / ".complete").exists():
        shutil.rmtree(folder, ignore_errors=True)
        tinymodel.build_chat_model(folder, hidden=hidden)
        (folder / ".complete").write_text("")
    return folder


def texts_and_prompts(folder: Path) -> tuple:
    import tinymodel
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    chats = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in tinymodel._training_texts(tokenizer)]
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
               for q, _ in tinymodel.CHATS + [(tinymodel.STORY, "")]]
    return chats, [list(p["input_ids"] if hasattr(p, "keys") else p) for p in prompts]


def reference(folder: Path, chats: list, prompts: list) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    net = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32).eval()
    with torch.inference_mode():
        nll = [torch.log_softmax(net(torch.tensor([ids])).logits[0, :-1], -1).gather(
            1, torch.tensor(ids[1:])[:, None]).sum().item() for ids in chats]
        greedy = []
        for ids in prompts:
            out = net.generate(torch.tensor([ids]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                               do_sample=False, pad_token_id=2)
            greedy.append(out[0, len(ids):].tolist())
    return {"nll": -sum(nll), "tokens": sum(len(ids) - 1 for ids in chats), "greedy": greedy}


def llamacpp(path: Path, chats: list, prompts: list) -> dict:
    import numpy as np
    from llama_cpp import Llama

    llm = Llama(str(path), n_ctx=1024, n_threads=2, logits_all=True, verbose=False)
    nll = 0.0
    for ids in chats:
        llm.reset()
        llm.eval(ids)
        logits = np.asarray(llm.scores[: len(ids) - 1], dtype=np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        nll -= float(logp[np.arange(len(ids) - 1), ids[1:]].sum())
    greedy = []
    for ids in prompts:
        out = []
        for token in llm.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0, reset=True):
            out.append(token)
            if len(out) == NEW_TOKENS:
                break
        greedy.append(out)
    return {"nll": nll, "greedy": greedy}


def measure(hidden: int) -> dict:
    from xlab_chat.engines.gguf_convert import convert
    from xlab_chat.engines.llamacpp import quantize

    folder = model(hidden)
    chats, prompts = texts_and_prompts(folder)
    fp32 = reference(folder, chats, prompts)
    work = OUT / f"quality-h{hidden}"
    work.mkdir(parents=True, exist_ok=True)
    plain = convert(folder, work / "F32.gguf")
    result = {"hidden": hidden, "tokens_scored": fp32["tokens"],
              "fp32_perplexity": math.exp(fp32["nll"] / fp32["tokens"]), "types": {}}
    for kind in TYPES:
        path = plain if kind == "F32" else work / f"{kind}.gguf"
        if kind != "F32":
            quantize(plain, path, kind)
        got = llamacpp(path, chats, prompts)
        same = sum(a == b for ours, theirs in zip(got["greedy"], fp32["greedy"]) for a, b in zip(ours, theirs))
        result["types"][kind] = {"perplexity_ratio": math.exp((got["nll"] - fp32["nll"]) / fp32["tokens"]),
                                 "greedy_agreement": same / (NEW_TOKENS * len(prompts)),
                                 "size_MB": path.stat().st_size / 1e6}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--json")
    args = parser.parse_args()
    write(measure(args.hidden), args.json)


if __name__ == "__main__":
    main()
