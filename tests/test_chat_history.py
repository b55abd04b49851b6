"""History in every shape a gradio version (or an API client) can send becomes clean role/content messages."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def normalise(app_modules):
    from xlab_chat.page.history import normalise_history

    return normalise_history


EXPECTED = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def test_gradio4_tuples(normalise):
    assert normalise([("hi", "hello")]) == EXPECTED
    assert normalise([["hi", None]]) == [{"role": "user", "content": "hi"}]


def test_gradio5_messages(normalise):
    assert normalise([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]) == EXPECTED


def test_gradio6_content_blocks_and_split_replies(normalise):
    history = [
        {"role": "user", "content": [{"type": "text", "text": "hi"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "hel"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "lo"}, {"type": "image", "url": "x.png"}]},
    ]
    assert normalise(history) == [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hel\nlo"}]


@pytest.mark.parametrize("history", [
    None, "text", 42, [42], [{"role": "system", "content": "evil"}], [{"content": "no role"}], [("a", "b", "c")],
    [{"role": "user", "content": {"type": "file", "path": "/etc/passwd"}}],
])
def test_wrong_shapes_are_skipped_not_trusted(normalise, history):
    assert normalise(history) == []


def test_history_starts_with_the_user_and_text_is_cleaned(normalise):
    history = [{"role": "assistant", "content": "orphan"}, {"role": "user", "content": "a\x00b\ud800c\n\td"}]
    assert normalise(history) == [{"role": "user", "content": "ab?c\n\td"}]
