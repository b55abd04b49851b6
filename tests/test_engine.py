"""The engine on the real tiny model, in-process: prompt, stop tokens, streaming, cancellation."""

from __future__ import annotations

import queue
import time

import pytest
import tinymodel


@pytest.fixture(scope="module")
def engine(app_modules, tiny_model):
    from xlab_chat.engines.transformers_engine import Engine

    return Engine.load(tiny_model, "auto")


def run(engine, ids, max_new_tokens=64, temperature=0.0, cancel_after=None):
    """Collect a whole generation; optionally cancel after some pieces arrive."""
    from xlab_chat.engines.transformers_engine import Generation

    inbox: queue.Queue = queue.Queue()
    generation = engine.start(ids, inbox.put, max_new_tokens, temperature, 0.8, 1.0)
    pieces = []
    while True:
        item = inbox.get(timeout=60)
        if item is Generation.DONE:
            return pieces, generation
        if isinstance(item, Exception):
            raise item
        pieces.append(item)
        if cancel_after is not None and len(pieces) == cancel_after:
            generation.cancel()


def test_stops_on_im_end_although_generation_config_lists_only_eos(engine, tiny_model):
    import json

    assert json.loads((tiny_model / "generation_config.json").read_text())["eos_token_id"] == 2
    assert engine.tokenizer.convert_tokens_to_ids("<|im_end|>") in engine.stop_ids
    ids, _ = engine.fit_prompt("", [], tinymodel.GREETING, 256)
    pieces, _ = run(engine, ids, max_new_tokens=256)
    reply = "".join(pieces)
    assert reply == tinymodel.GREETING_REPLY  # what the fixture model was trained to answer, ended by <|im_end|>
    assert len(pieces) > 3


def test_streamed_pieces_equal_one_full_decode(engine):
    """Incremental decoding keeps spaces, CJK and emoji that span several tokens intact."""
    from xlab_chat.engines.transformers_engine import IncrementalDecoder

    text = "Hello world, 你好 世界! 😀 two  spaces\nnew line 🚀🎉"
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    decoder = IncrementalDecoder(engine.tokenizer, engine.stop_ids)
    streamed = "".join(decoder.push([i]) for i in ids)
    assert streamed == engine.tokenizer.decode(ids, skip_special_tokens=True)
    assert "\ufffd" not in streamed


def test_greedy_is_deterministic_and_cancel_ends_the_thread_fast(engine):
    ids, _ = engine.fit_prompt("", [], tinymodel.STORY, 3000)
    first, _ = run(engine, ids, max_new_tokens=20)
    second, _ = run(engine, ids, max_new_tokens=20)
    assert first == second and len(first) > 5
    started = time.monotonic()
    pieces, generation = run(engine, ids, max_new_tokens=3000, cancel_after=10)
    assert generation.finished.wait(timeout=5)
    assert time.monotonic() - started < 2.0
    assert 10 <= len(pieces) < 100  # it stopped, not ran to 3000 tokens


def test_history_is_truncated_oldest_first_and_too_long_input_refused(engine):
    from xlab_chat.engines.transformers_engine import InputTooLong

    turn = [{"role": "user", "content": "la " * 300}, {"role": "assistant", "content": "la " * 300}]
    history = turn * 12  # far beyond the 4096-token context
    ids, dropped = engine.fit_prompt("be brief", history, "Hello", 1024)
    assert dropped > 0
    assert len(ids) + 1024 <= engine.context_length
    recent = engine.encode_chat([{"role": "system", "content": "be brief"}] + history[2 * dropped:]
                                + [{"role": "user", "content": "Hello"}])
    assert ids == recent
    with pytest.raises(InputTooLong, match="too long"):
        engine.fit_prompt("", [], "la " * 5000, 1024)


def test_generation_error_reaches_the_caller_and_frees_the_thread(engine):
    """An exception inside generate() (here: a bad sampling value) arrives as an item, not a hang."""
    from xlab_chat.engines.transformers_engine import Generation

    inbox: queue.Queue = queue.Queue()
    ids, _ = engine.fit_prompt("", [], "Hello", 16)
    generation = engine.start(ids, inbox.put, 16, 0.7, -1.0, 1.0)  # top_p < 0 is rejected by transformers
    item = inbox.get(timeout=30)
    assert isinstance(item, Exception) and item is not Generation.DONE
    assert generation.finished.wait(timeout=5)
    assert engine.active == 0


def test_placement_never_uses_fp16_on_cpu(app_modules):
    import torch
    from xlab_chat.engines.transformers_engine import choose_placement

    placement = choose_placement("cpu")
    assert placement.device == "cpu" and placement.dtype in (torch.bfloat16, torch.float32)
    with pytest.raises(ValueError, match="float16 does not run on the CPU"):
        choose_placement("cpu", "float16")
