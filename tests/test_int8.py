"""int8 weights on the CPU: each kernel's quality against float32 on a trained model, the choice by timing, fallbacks.

Quality is measured on the trained tiny chat model (converted to InternLM2's layout and loaded by the app's
native loader, as an InternLM2-chat-1.8B deploy would be) on text it was not trained on: perplexity and
greedy top-1 agreement over 64 steps, int8 against float32, for every kernel the chooser may pick.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import tinymodel
from internlm2_fixture import internlm2_from_llama

UNSEEN = ("On a rainy morning the old fisherman mended his nets by the harbour, humming a song his mother "
          "taught him. 雨后的港口很安静，渔夫慢慢地修补着渔网。")
FIGURES: dict = {}
KERNEL_NAMES = ("fbgemm", "int8pack", "int8pack-fp32", "per-token", "float")


@pytest.fixture(scope="module")
def internlm2_chat(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return internlm2_from_llama(tiny_model, tmp_path_factory.mktemp("int8") / "internlm2")


@pytest.fixture(scope="module")
def models(app_modules, internlm2_chat: Path):
    import torch
    from xlab_chat.engines import int8
    from xlab_chat.engines.internlm2 import load_internlm2_as_llama, native_tokenizer

    if not int8.supported():
        pytest.fail(f"no int8 kernel runs with torch {torch.__version__} here")
    reference = load_internlm2_as_llama(internlm2_chat, torch.float32)
    quantized = load_internlm2_as_llama(internlm2_chat, torch.float32, quantize_int8=True)
    return reference, quantized, native_tokenizer(internlm2_chat)


def run_on(quantized, name: str):
    """The quantized model with every Linear on kernel ``name``, for one row and for many."""
    from xlab_chat.engines import int8
    from xlab_chat.engines.kernels import FALLBACK

    assert name == FALLBACK or name in int8.available(), f"kernel {name} does not run here: {int8.available()}"
    int8.use_kernels_(quantized, name, name)
    return quantized


def perplexity(model, ids) -> float:
    import torch

    with torch.inference_mode():
        loss = model(input_ids=ids, labels=ids).loss
    return math.exp(float(loss))


def test_every_linear_is_int8_but_the_embeddings(models):
    from xlab_chat.engines.int8 import Int8Linear

    _, quantized, _ = models
    import torch

    linears = [name for name, m in quantized.named_modules() if isinstance(m, torch.nn.Linear)]
    int8s = [name for name, m in quantized.named_modules() if isinstance(m, Int8Linear)]
    assert linears == [] and "lm_head" in int8s and len(int8s) == 1 + 7 * quantized.config.num_hidden_layers
    assert quantized.model.embed_tokens.weight.dtype.is_floating_point


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_int8_perplexity_within_three_percent_of_float32_on_unseen_text(models, kernel):
    import torch

    reference, quantized, tokenizer = models
    ids = torch.tensor([tokenizer(UNSEEN)["input_ids"]])
    fp32, q8 = perplexity(reference, ids), perplexity(run_on(quantized, kernel), ids)
    figures = dict(tokens=ids.shape[1], ppl_fp32=round(fp32, 3), ppl_int8=round(q8, 3), ratio=round(q8 / fp32, 4))
    FIGURES[kernel] = {**FIGURES.get(kernel, {}), **figures}
    print(f"\n[int8 quality, {kernel}] {figures}")
    assert q8 / fp32 <= 1.03, figures


def agreement(reference, candidate, prompt, steps: int = 64) -> float:
    """Share of the float32 model's greedy tokens that the candidate ranks first, teacher-forced."""
    import torch

    with torch.inference_mode():
        greedy = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                    min_new_tokens=steps, do_sample=False, pad_token_id=2)
        logits = candidate(input_ids=greedy).logits[0, prompt.shape[1] - 1:-1]
    assert greedy.shape[1] - prompt.shape[1] == steps
    return float((logits.argmax(-1) == greedy[0, prompt.shape[1]:]).float().mean())


@pytest.fixture(scope="module")
def bf16(app_modules, internlm2_chat: Path):
    import torch
    from xlab_chat.engines.internlm2 import load_internlm2_as_llama

    return load_internlm2_as_llama(internlm2_chat, torch.bfloat16)


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_int8_greedy_top1_agrees_with_float32_over_64_steps(models, bf16, kernel):
    """On unseen text a 64-wide model's logits are nearly flat (perplexity above the vocabulary size), so
    near-ties decide many steps: int8 is held to what plain bfloat16 (the CPU default without int8) achieves."""
    import torch

    reference, quantized, tokenizer = models
    quantized = run_on(quantized, kernel)
    unseen = torch.tensor([tokenizer(UNSEEN[:60])["input_ids"]])
    text = tokenizer.apply_chat_template([{"role": "user", "content": tinymodel.STORY}], add_generation_prompt=True,
                                         tokenize=False)
    chat = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    figures = {"unseen_int8": agreement(reference, quantized, unseen),
               "unseen_bf16": agreement(reference, bf16, unseen),
               "chat_int8": agreement(reference, quantized, chat)}
    top1 = {f"top1_64_{key}": round(value, 4) for key, value in figures.items()}
    FIGURES[kernel] = {**FIGURES.get(kernel, {}), **top1}
    print(f"\n[int8 agreement, {kernel}] {figures}")
    assert figures["unseen_int8"] >= min(0.8, figures["unseen_bf16"] - 0.05), figures
    assert figures["chat_int8"] >= 0.95, figures


@pytest.mark.parametrize("kernel", KERNEL_NAMES)
def test_the_trained_reply_survives_int8(models, kernel):
    """What the chat model was trained to say, it still says in int8 (greedy, through the app's engine: the prompt
    runs on many rows, each new token on one)."""
    from xlab_chat.engines.transformers_engine import Engine, Placement

    _, quantized, tokenizer = models
    quantized = run_on(quantized, kernel)
    engine = Engine(quantized, tokenizer, Placement("cpu", quantized.dtype, "CPU · int8", int8=True))
    import queue

    ids, _ = engine.fit_prompt("", [], tinymodel.GREETING, 64)
    items: queue.Queue = queue.Queue()
    generation = engine.start(ids, items.put, 64, 0.0, 0.8, 1.0)
    assert generation.finished.wait(60)
    reply = "".join(item for item in items.queue if isinstance(item, str))
    assert reply == tinymodel.GREETING_REPLY


def test_quantize_auto_picks_int8_on_the_cpu_and_respects_an_explicit_dtype(app_modules):
    import torch
    from xlab_chat.engines.transformers_engine import choose_placement

    auto = choose_placement("cpu", "auto", "auto")
    assert auto.int8 and auto.label == "CPU · int8"
    assert auto.dtype == choose_placement("cpu", "auto", "none").dtype  # the rest of the model as without int8
    assert not choose_placement("cpu", "float32", "auto").int8  # a DTYPE asked for wins over auto
    assert choose_placement("cpu", "float32", "int8").int8
    assert choose_placement("cpu", "auto", "none").dtype in (torch.bfloat16, torch.float32)


def test_the_engine_times_the_kernels_uses_the_fastest_and_names_them(app_modules, internlm2_chat, capsys):
    """Engine start on the real checkpoint: one log line with every kernel's timing for each phase, the Linears
    running the kernels it names, and the page header's label naming them too."""
    from xlab_chat.engines import int8
    from xlab_chat.engines.transformers_engine import Engine

    engine = Engine.load(internlm2_chat, "cpu", quantize="int8")
    lines = [line for line in capsys.readouterr().out.splitlines() if "int8 kernels" in line]
    assert len(lines) == 1, lines
    decode_part, prefill_part = lines[0].split("ms per token: decode ")[1].split("; prefill ")
    for name in int8.available():
        assert (name in decode_part) and (name in prefill_part or name == "int8pack-fp32"), (name, lines[0])
    assert "float" in prefill_part and "float" not in decode_part
    linears = [m for m in engine.model.modules() if isinstance(m, int8.Int8Linear)]
    kernels_used = {(m.decode_kernel, m.prefill_kernel) for m in linears}
    assert len(kernels_used) == 1
    decode, prefill = kernels_used.pop()
    assert lines[0].startswith(f"[engine] int8 kernels: decode {decode}, prefill {prefill}")
    assert decode in int8.available()
    expected = decode if decode == prefill else f"{decode}, prefill {prefill}"
    assert engine.placement.label == f"CPU · int8 ({expected})"


def test_the_choice_is_the_fastest_kernel_for_each_phase(app_modules):
    from xlab_chat.engines.kernels import choose

    decode = {"fbgemm": 2.0, "int8pack": 1.0, "per-token": 3.0}
    prefill = {"fbgemm": 1.0, "int8pack": 9.0, "per-token": 5.0, "float": 6.0}
    split = choose(decode, prefill, second_copy_bytes=10, available_bytes=100)
    assert (split.decode, split.prefill, split.extra_bytes) == ("int8pack", "fbgemm", 10)
    assert split.label == "int8pack, prefill fbgemm"
    # A quantised kernel slower than the float matmul never runs the prompt.
    slow = choose(decode, {**prefill, "fbgemm": 7.0, "per-token": 8.0}, 10, 100)
    assert (slow.decode, slow.prefill, slow.extra_bytes) == ("int8pack", "float", 0)  # both read q: no copy
    same = choose({**decode, "fbgemm": 0.5}, prefill, 10, 100)
    assert (same.decode, same.prefill, same.extra_bytes, same.label) == ("fbgemm", "fbgemm", 0, "fbgemm")


def test_a_second_weight_layout_only_when_it_fits_and_pays(app_modules):
    from xlab_chat.engines.kernels import SPLIT_GAIN, TURN, choose

    decode = {"fbgemm": 2.0, "int8pack": 1.0, "per-token": 1.5}
    prefill = {"fbgemm": 1.0, "int8pack": 9.0, "per-token": 5.0, "float": 6.0}
    for available in (19, None):  # too little free RAM, or a system that does not say
        single = choose(decode, prefill, second_copy_bytes=10, available_bytes=available)
        assert (single.decode, single.prefill, single.extra_bytes) == ("fbgemm", "fbgemm", 0)
        assert "does not fit" in single.note
    # int8pack + fbgemm would be the fastest pair, but fbgemm alone is within SPLIT_GAIN of it: one layout
    close = {**decode, "int8pack": 2.0 - 0.5 * SPLIT_GAIN * (TURN[0] + 2 * TURN[1]) / TURN[1]}
    near = choose(close, prefill, second_copy_bytes=10, available_bytes=100)
    assert (near.decode, near.prefill, near.extra_bytes) == ("fbgemm", "fbgemm", 0) and "under 10%" in near.note


def test_one_row_runs_on_the_decode_kernel_and_many_rows_on_the_prefill_kernel(app_modules):
    import torch
    from xlab_chat.engines import int8
    from xlab_chat.engines.kernels import KERNELS, MANY_ROWS

    torch.manual_seed(0)
    linear = int8.Int8Linear.from_linear(torch.nn.Linear(256, 96, bias=False))
    q = linear.weight_int8.clone()
    linear.use_kernels("int8pack", "fbgemm")
    assert torch.equal(linear.weight_int8, q) and linear._prepared.keys() == {"int8pack", "fbgemm"}  # two layouts
    for rows, kernel in ((1, "int8pack"), (MANY_ROWS - 1, "int8pack"), (MANY_ROWS, "fbgemm"), (300, "fbgemm")):
        x = torch.randn(rows, 256)
        other = "fbgemm" if kernel == "int8pack" else "int8pack"
        ran = linear(x)
        assert torch.equal(ran, KERNELS[kernel].run(x, linear._prepared[kernel]).to(x.dtype)), (rows, kernel)
        assert not torch.equal(ran, KERNELS[other].run(x, linear._prepared[other]).to(x.dtype))
    linear.use_kernels("fbgemm", "fbgemm")  # fbgemm's packed copy is then the only one kept
    assert linear.weight_int8 is None and torch.equal(linear.int8_weight(), q)
    linear.use_kernels("per-token", "float")
    assert torch.equal(linear.weight_int8, q)


def test_a_kernel_with_wrong_results_is_never_timed(app_modules, monkeypatch):
    """The timing run checks each kernel's result on the model's own weights first."""
    import torch
    from xlab_chat.engines import int8, kernels

    wrong = kernels.Kernel("wrong", lambda q, s: (q, s), lambda x, w: (x @ w[0].to(x.dtype).t()) * 2 * w[1])
    monkeypatch.setitem(kernels.KERNELS, "wrong", wrong)
    weights = [int8.quantize_weight(torch.randn(64, 128)) for _ in range(3)]
    decode, prefill = kernels.measure(weights, torch.float32, ["wrong", *int8.available(), kernels.FALLBACK], rounds=1)
    assert "wrong" not in decode and "wrong" not in prefill
    assert set(decode) == set(int8.available())
    assert set(prefill) == {name for name in int8.available() if name != "int8pack-fp32"} | {"float"}
    assert all(ms > 0 for ms in [*decode.values(), *prefill.values()])


def test_without_an_int8_kernel_the_app_falls_back_with_one_line(app_modules, monkeypatch, capsys):
    from xlab_chat.engines import int8
    from xlab_chat.engines.transformers_engine import choose_placement

    monkeypatch.setattr(int8, "_available", [])  # what an old torch without the kernels reports
    placement = choose_placement("cpu", "auto", "auto")
    out = capsys.readouterr().out
    assert not placement.int8 and "int8" not in placement.label
    assert out.count("\n") == 1 and "int8 does not run" in out
