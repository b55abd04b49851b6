"""What a waiting user sees in a real browser (chromium through Playwright), on gradio 6 and on gradio 4.44.

gradio's own queue shows a waiting user "queue: 3/10 |" at best (in the status tracker, in English) and turns one
too many away in English ("This application is currently busy. Please try again."); the page's waiting line says
both in the chat, in the user's language.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from apprunner import AppProcess, render
from paced_server import MODEL, PacedServer
from test_browser import browser, last_reply, send, shot  # noqa: F401 - browser is a fixture

pytestmark = pytest.mark.browser


def new_page(browser, tmp_path: Path):  # noqa: F811 - the fixture's value
    page = browser.new_context(viewport={"width": 1000, "height": 800}).new_page()
    page.shots = tmp_path  # type: ignore[attr-defined]
    return page


def wait_reply(page, predicate, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = last_reply(page)
        if predicate(text):
            return text
        time.sleep(0.1)
    shot(page, "timeout")
    raise AssertionError(f"{what} not seen in {timeout} s; last reply: {last_reply(page)!r}")


@pytest.mark.parametrize("stack", ["gradio6", "gradio4"])
def test_a_waiting_user_sees_their_place_and_one_too_many_is_told_the_queue_is_full(
        browser, tmp_path: Path, stack: str, request: pytest.FixtureRequest):  # noqa: F811 - the fixture
    python = sys.executable if stack == "gradio6" else request.getfixturevalue("legacy_python")
    with PacedServer(rate=10, tokens=50) as server:
        folder = render(tmp_path / "out", engine="openai", engine_url=server.url, engine_model=MODEL,
                        ui_language="zh", validate_model_repo=False)
        app = AppProcess(folder, {"CONCURRENCY_LIMIT": "1", "QUEUE_SIZE": "1"}, tmp_path / "app.log", python=python)
        try:
            app.wait_stage(("ready",))
            first, second, third = (new_page(browser, tmp_path) for _ in range(3))
            for page in (first, second, third):
                page.goto(app.url)
                page.wait_for_function("(document.querySelector('#chat-input textarea') || {disabled: true}).disabled"
                                       " === false", timeout=30_000)
            send(first, "你好")
            wait_reply(first, lambda text: "word2" in text, 15, "the first reply streaming")
            send(second, "我也想问")
            wait_reply(second, lambda text: text.startswith("⏳ 正在排队：你是第 1 位"), 10, "the place in line")
            shot(second, f"{stack}-waiting")
            send(third, "还有我")
            full = "⏳ 现在使用的人太多，排队已满（1 人在等待）。请过一会儿再发送。"
            wait_reply(third, lambda text: text == full, 10, "the full line told")
            shot(third, f"{stack}-queue-full")
            assert "word49" in wait_reply(first, lambda text: "word49" in text, 15, "the first reply's end")
            wait_reply(second, lambda text: text.startswith("word0"), 10, "the second reply starting after the first")
            assert "word49" in wait_reply(second, lambda text: "word49" in text, 15, "the second reply's end")
            assert server.stats()["peak"] == 1
        finally:
            app.stop()
    assert "Traceback" not in app.log
