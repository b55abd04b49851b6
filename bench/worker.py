"""What the benchmarks run in a fresh interpreter: each mode prints one JSON object per measurement.

  baseline FOLDER PROMPT TOKENS   plain ``model.generate`` on this process's main thread; reads commands
                                  from stdin ("run", "first", "quit") so the parent can alternate it with HTTP runs
  bare FOLDER                     import, load and generate one token: the floor for the app's warm start
  loadmem FOLDER                  peak RSS of the app's Engine.load, with the interpreter's baseline
  loader native|remote FOLDER N   an InternLM2 checkpoint: load time, peak RSS, greedy tokens/s
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

T0 = time.perf_counter()


def say(record: dict) -> None:
    print(json.dumps(record), flush=True)


def baseline(folder: str, prompt: str, tokens: int) -> None:
    import torch
    from common import clock
    from xlab_chat.engines.transformers_engine import Engine, IncrementalDecoder

    engine = Engine.load(Path(folder), "cpu", "float32")
    ids, _ = engine.fit_prompt("", [], prompt, tokens)
    input_ids = torch.tensor([ids])
    common = dict(attention_mask=torch.ones_like(input_ids), eos_token_id=engine.stop_ids,
                  pad_token_id=engine.stop_ids[0], repetition_penalty=1.0, do_sample=False)

    def generate(count: int) -> tuple:
        started = clock()
        with torch.inference_mode():
            out = engine.model.generate(input_ids, max_new_tokens=count, **common)
        return clock() - started, out[0, len(ids):].tolist()

    _, new = generate(tokens)  # warm-up, and what the app must reply
    decoder = IncrementalDecoder(engine.tokenizer, engine.stop_ids)
    pieces = [decoder.push([token]) for token in new]
    first_visible = next(i for i, piece in enumerate(pieces) if piece)
    say({"ready": True, "prompt_tokens": len(ids), "tokens": len(new), "text": "".join(pieces),
         "first_visible": first_visible, "stop_ids_seen": sorted(set(new) & set(engine.stop_ids)),
         "params": sum(p.numel() for p in engine.model.parameters())})
    for line in sys.stdin:
        command = line.strip()
        if command == "run":
            elapsed, new = generate(tokens)
            say({"elapsed": elapsed, "tokens": len(new)})
        elif command == "first":  # until the first token the app would show
            elapsed, _ = generate(first_visible + 1)
            say({"elapsed": elapsed})
        else:
            break


def bare(folder: str) -> None:
    """What any script needs to answer: import, load, apply the chat template, one greedy token."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    text = tokenizer.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False,
                                         add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                             pad_token_id=2)
    say({"reply": tokenizer.decode(out[0, ids.shape[1]:]), "elapsed_in_process": time.perf_counter() - T0})


def _weight_bytes(folder: str) -> int:
    return sum(p.stat().st_size for p in Path(folder).iterdir() if p.suffix in (".safetensors", ".bin"))


def _import_model_code() -> None:
    """transformers imports its modeling code lazily (~110 MiB): part of the interpreter, not of the weights."""
    from transformers import GenerationMixin, LlamaForCausalLM, PreTrainedModel  # noqa: F401


def loadmem(folder: str) -> None:
    import torch
    from common import clock, proc_status_kib, reset_peak_rss
    from xlab_chat.engines.transformers_engine import Engine

    _import_model_code()
    base = proc_status_kib("VmRSS") * 1024
    reset_peak_rss()
    started = clock()
    engine = Engine.load(Path(folder), "cpu", "float32")
    elapsed = clock() - started
    load_peak, load_rss = proc_status_kib("VmHWM") * 1024, proc_status_kib("VmRSS") * 1024
    # transformers maps safetensors lazily: the weights are read (and resident) only once a forward pass runs.
    ids = torch.tensor([engine.fit_prompt("", [], "Hello", 1)[0]])
    with torch.inference_mode():
        engine.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=1, do_sample=False,
                              pad_token_id=engine.stop_ids[0])
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    say({"baseline_rss": base, "load_peak_rss": load_peak, "load_rss": load_rss, "weight_bytes": _weight_bytes(folder),
         "peak_rss": proc_status_kib("VmHWM") * 1024, "rss_after": proc_status_kib("VmRSS") * 1024,
         "param_bytes": params, "load_s": elapsed})


def loader(kind: str, folder: str, tokens: int) -> None:
    import torch
    from common import clock, proc_status_kib, reset_peak_rss
    from transformers import AutoModelForCausalLM
    from xlab_chat.engines.internlm2 import load_internlm2_as_llama

    _import_model_code()
    base = proc_status_kib("VmRSS") * 1024
    reset_peak_rss()
    started = clock()
    if kind == "native":
        model = load_internlm2_as_llama(folder, torch.float32, "cpu")
    else:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32).eval()
    load_s = clock() - started
    peak = proc_status_kib("VmHWM") * 1024
    prompt = torch.tensor([[1, *range(10, 42)]])
    kwargs = dict(attention_mask=torch.ones_like(prompt), do_sample=False, pad_token_id=2, eos_token_id=None,
                  min_new_tokens=tokens, max_new_tokens=tokens)
    with torch.inference_mode():
        model.generate(prompt, **{**kwargs, "min_new_tokens": 1, "max_new_tokens": 1})
        ready_s = clock() - started  # load + first token: lazily mapped weights have been read by now
        serving_peak = proc_status_kib("VmHWM") * 1024
        model.generate(prompt, **{**kwargs, "min_new_tokens": 4, "max_new_tokens": 4})  # warm-up
        started = clock()
        out = model.generate(prompt, **kwargs)
        gen_s = clock() - started
    new = out[0, prompt.shape[1]:].tolist()
    assert len(new) == tokens, len(new)
    say({"kind": kind, "load_s": load_s, "ready_s": ready_s, "baseline_rss": base, "peak_rss": peak,
         "serving_peak_rss": serving_peak, "weight_bytes": _weight_bytes(folder),
         "tokens_per_s": tokens / gen_s, "ids": new})


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import common  # noqa: F401 - puts the app's modules on sys.path, no bytecode

    mode, args = sys.argv[1], sys.argv[2:]
    if mode == "baseline":
        baseline(args[0], args[1], int(args[2]))
    elif mode == "bare":
        bare(args[0])
    elif mode == "loadmem":
        loadmem(args[0])
    elif mode == "loader":
        loader(args[0], args[1], int(args[2]))
    else:
        raise SystemExit(f"unknown mode {mode}")


if __name__ == "__main__":
    main()
