"""int8 weights on the CPU: quality against float32 on a trained model, the loader's per-shard path, fallbacks.

Quality is measured on the trained tiny chat model (converted to InternLM2's layout and loaded by the app's
native loader, as an InternLM2-chat-1.8B deploy would be) on text it was not trained on: perplexity and
greedy top-1 agreement over 64 steps, int8 against float32.
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


@pytest.fixture(scope="module")
def internlm2_chat(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return internlm2_from_llama(tiny_model, tmp_path_factory.mktemp("int8") / "internlm2")


@pytest.fixture(scope="module")
def models(app_modules, internlm2_chat: Path):
    import torch
    from xlab_chat.engines import int8
    from xlab_chat.engines.internlm2 import load_internlm2_as_llama, native_tokenizer

    if not int8.supported():
        pytest.fail(f"no int8 kernel runs with torch {torch.__version__} here (backend {int8.pick_backend()})")
    reference = load_internlm2_as_llama(internlm2_chat, torch.float32)
    quantized = load_internlm2_as_llama(internlm2_chat, int8.preferred_compute_dtype(), quantize_int8=True)
    return reference, quantized, native_tokenizer(internlm2_chat)


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


def test_int8_perplexity_within_three_percent_of_float32_on_unseen_text(models):
    import torch

    reference, quantized, tokenizer = models
    ids = torch.tensor([tokenizer(UNSEEN)["input_ids"]])
    fp32, q8 = perplexity(reference, ids), perplexity(quantized, ids)
    FIGURES.update(tokens=ids.shape[1], ppl_fp32=round(fp32, 3), ppl_int8=round(q8, 3), ratio=round(q8 / fp32, 4))
    print(f"\n[int8 quality] {FIGURES}")
    assert q8 / fp32 <= 1.03, FIGURES


def agreement(reference, candidate, prompt, steps: int = 64) -> float:
    """Share of the float32 model's greedy tokens that the candidate ranks first, teacher-forced."""
    import torch

    with torch.inference_mode():
        greedy = reference.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=steps,
                                    min_new_tokens=steps, do_sample=False, pad_token_id=2)
        logits = candidate(input_ids=greedy).logits[0, prompt.shape[1] - 1:-1]
    assert greedy.shape[1] - prompt.shape[1] == steps
    return float((logits.argmax(-1) == greedy[0, prompt.shape[1]:]).float().mean())


def test_int8_greedy_top1_agrees_with_float32_over_64_steps(models, internlm2_chat):
    """On unseen text a 64-wide model's logits are nearly flat (perplexity above the vocabulary size), so
    near-ties decide many steps: int8 is held to what plain bfloat16 (the CPU default without int8) achieves."""
    import torch
    from xlab_chat.engines.internlm2 import load_internlm2_as_llama

    reference, quantized, tokenizer = models
    bf16 = load_internlm2_as_llama(internlm2_chat, torch.bfloat16)
    unseen = torch.tensor([tokenizer(UNSEEN[:60])["input_ids"]])
    text = tokenizer.apply_chat_template([{"role": "user", "content": tinymodel.STORY}], add_generation_prompt=True,
                                         tokenize=False)
    chat = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    figures = {"unseen_int8": agreement(reference, quantized, unseen),
               "unseen_bf16": agreement(reference, bf16, unseen),
               "chat_int8": agreement(reference, quantized, chat)}
    FIGURES.update({f"top1_64_{key}": round(value, 4) for key, value in figures.items()})
    print(f"\n[int8 agreement] {figures}")
    assert figures["unseen_int8"] >= min(0.8, figures["unseen_bf16"] - 0.05), figures
    assert figures["chat_int8"] >= 0.95, figures


def test_the_trained_reply_survives_int8(models):
    """What the chat model was trained to say, it still says in int8 (greedy, through the app's engine)."""
    from xlab_chat.engines.transformers_engine import Engine, Placement

    _, quantized, tokenizer = models
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
    assert not choose_placement("cpu", "float32", "auto").int8  # a DTYPE asked for wins over auto
    assert choose_placement("cpu", "float32", "int8").int8
    assert choose_placement("cpu", "auto", "none").dtype in (torch.bfloat16, torch.float32)


def test_without_an_int8_kernel_the_app_falls_back_with_one_line(app_modules, monkeypatch, capsys):
    from xlab_chat.engines import int8
    from xlab_chat.engines.transformers_engine import choose_placement

    monkeypatch.setattr(int8, "_backend_cache", "dequant")  # what an old torch without the kernels reports
    placement = choose_placement("cpu", "auto", "auto")
    out = capsys.readouterr().out
    assert not placement.int8 and "int8" not in placement.label
    assert out.count("\n") == 1 and "int8 does not run" in out
