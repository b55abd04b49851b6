"""The page in a real browser (Debian's chromium through Playwright): progress, streaming, Stop, languages, failure.

Screenshots of every state land in the test's tmp folder, so a failing run can be looked at.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import tinymodel
from apprunner import AppProcess, render
from faultkit import FaultHost, publish_with_blob

pytestmark = pytest.mark.browser
CHROMIUM = "/usr/bin/chromium"
USER, TOKEN = "student", "browser-test-token-5150"


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM, headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"],
        )
        yield browser
        browser.close()


@pytest.fixture()
def page(browser, tmp_path: Path):
    context = browser.new_context(viewport={"width": 1200, "height": 1000})
    page = context.new_page()
    page.shots = tmp_path  # type: ignore[attr-defined]
    yield page
    context.close()
# These pages need the tiny model's long rambling replies (Stop mid-reply, a reply that fills the context),
# which it was trained to give in float32; int8 on a 64-wide model ends them early (tests/test_int8.py).
RAMBLES = {"QUANTIZE": "none", "DTYPE": "float32"}  # float32 on every CPU: bfloat16 (chosen where fast) ends them


def shot(page, name: str) -> None:
    page.screenshot(path=str(page.shots / f"{name}.png"), full_page=True)


def status_text(page) -> str:
    return page.inner_text("#model-status")


def wait_text(page, predicate, timeout: float, what: str) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = status_text(page)
        if predicate(text):
            return text
        time.sleep(0.2)
    shot(page, "timeout")
    raise AssertionError(f"{what} not seen in {timeout} s; status: {status_text(page)!r}")


def last_reply(page) -> str:
    replies = page.locator('[data-testid="bot"]')
    return replies.nth(replies.count() - 1).inner_text() if replies.count() else ""


def send(page, text: str) -> None:
    box = page.locator("#chat-input textarea")
    box.fill(text)
    box.press("Enter")


def test_progress_streaming_and_stop_in_chinese(page, tiny_model: Path, tmp_path: Path):
    bare = publish_with_blob(tiny_model, tmp_path / "host", blob_bytes=3_000_000)
    with FaultHost(bare.parent, USER, TOKEN, rate=400_000) as host:
        # 3000 new tokens: the story must still be streaming when Stop is pressed, however fast the machine.
        folder = render(tmp_path / "out", model_repo=host.url(bare.name), hardware="cpu", ui_language="zh",
                        temperature=0, max_new_tokens=3000, validate_model_repo=False)
        env = {"MODEL_DIR": str(tmp_path / "weights"), "MODEL_REPO_TOKEN": TOKEN, "MODEL_REPO_USER": USER, **RAMBLES}
        app = AppProcess(folder, env, tmp_path / "app.log")
        try:
            app.wait_serving()
            page.goto(app.url)
            seen = wait_text(page, lambda s: "正在下载模型" in s and "%" in s, 90, "download progress")
            assert "MB" in seen and "已用" in seen
            assert page.locator("#chat-input textarea").is_disabled()
            shot(page, "1-downloading")
            wait_text(page, lambda s: "模型已就绪" in s, 180, "ready")
            assert "CPU" in status_text(page)
            page.wait_for_function("!document.querySelector('#chat-input textarea').disabled", timeout=10_000)
            shot(page, "2-ready")

            send(page, tinymodel.STORY)
            page.wait_for_function("document.querySelectorAll('[data-testid=bot]').length > 0", timeout=30_000)
            first = last_reply(page)
            time.sleep(0.7)
            second = last_reply(page)
            assert len(second) > len(first) > 0 and second.startswith(first.strip()[:5])
            shot(page, "3-streaming")

            page.get_by_role("button", name="停止").click()
            deadline = time.monotonic() + 5
            while app.status()["generating"] and time.monotonic() < deadline:
                time.sleep(0.1)
            assert app.status()["generating"] == 0
            frozen = last_reply(page)
            time.sleep(1.0)
            assert last_reply(page) == frozen
            shot(page, "4-stopped")

            assert page.locator('[aria-label="Copy message"]').count() >= 1  # every message has a copy button
            page.locator('[aria-label="Clear"]').first.click()  # the half story would steer the tiny model
            page.wait_for_function("document.querySelectorAll('[data-testid=bot]').length === 0", timeout=10_000)
            send(page, tinymodel.GREETING)
            page.wait_for_function(
                "(want) => { const r = document.querySelectorAll('[data-testid=bot]');"
                " return r.length && r[r.length - 1].innerText.trim() === want; }",
                arg=tinymodel.GREETING_REPLY, timeout=30_000)
            shot(page, "5-next-message")
        finally:
            app.stop()


@pytest.mark.parametrize(("language", "labels"), [
    ("zh", ["发送", "生成参数", "示例", "模型"]),
    ("en", ["Send", "Generation settings", "Examples", "Model"]),
])
def test_each_language_shows_its_own_labels(page, model_remote: str, tmp_path: Path, language: str, labels: list):
    folder = render(tmp_path / "out", model_repo=model_remote, hardware="cpu", ui_language=language,
                    validate_model_repo=False)
    app = AppProcess(folder, {"MODEL_DIR": str(tmp_path / "weights"), **RAMBLES}, tmp_path / "app.log")
    try:
        app.wait_stage(("ready",))
        page.goto(app.url)
        page.wait_for_selector("#chat-input textarea")
        body = page.inner_text("body")
        shot(page, f"labels-{language}")
        for label in labels:
            assert label in body, label
        other = {"zh": ["Generation settings", "Send"], "en": ["生成参数", "发送"]}[language]
        assert not any(label in body for label in other)
    finally:
        app.stop()


def test_failed_start_shows_the_error_and_its_fix_on_the_page(page, tmp_path: Path):
    folder = render(tmp_path / "out", model_repo=(tmp_path / "no-such-model.git").as_uri(), hardware="cpu",
                    ui_language="en", validate_model_repo=False)
    app = AppProcess(folder, {"MODEL_DIR": str(tmp_path / "weights")}, tmp_path / "app.log")
    try:
        app.wait_serving()
        page.goto(app.url)
        text = wait_text(page, lambda s: "could not start" in s, 120, "the failure")
        assert "does not exist" in text and "How to fix" in text
        page.locator("#chat-area").wait_for(state="hidden", timeout=5_000)  # same update as the text; let it paint
        shot(page, "failed")
        assert app.process.poll() is None  # still serving
    finally:
        app.stop()


def wait_while_the_reply_grows(page, app: AppProcess, stall: float = 60, cap: float = 900) -> None:
    """Wait for the engine to finish, however slow the machine, as long as the reply keeps growing; a reply that
    stops growing for `stall` seconds while the engine says it is generating is a hang, and fails."""
    started = last_change = time.monotonic()
    seen = ""
    while app.status()["generating"]:
        replies = page.locator("[data-testid=bot]").all_inner_texts()
        if replies and replies[-1] != seen:
            seen, last_change = replies[-1], time.monotonic()
        now = time.monotonic()
        if now - last_change > stall or now - started > cap:
            shot(page, "stalled")
            raise AssertionError(f"the reply stopped growing for {now - last_change:.0f} s while generating"
                                 f" ({len(seen)} characters after {now - started:.0f} s)")
        time.sleep(0.5)


def test_dropped_turns_and_too_long_input_are_told_to_the_user(page, model_remote: str, tmp_path: Path):
    """max_new_tokens 2048 leaves 2048 of the tiny model's 4096 positions for the prompt."""
    folder = render(tmp_path / "out", model_repo=model_remote, hardware="cpu", ui_language="en", temperature=0,
                    max_new_tokens=2048, validate_model_repo=False)
    app = AppProcess(folder, {"MODEL_DIR": str(tmp_path / "weights"), **RAMBLES}, tmp_path / "app.log")
    try:
        app.wait_stage(("ready",))
        page.goto(app.url)
        page.wait_for_selector("#chat-input textarea")
        page.wait_for_function("!document.querySelector('#chat-input textarea').disabled", timeout=60_000)
        long_turn = "la " * 1200

        send(page, long_turn)
        page.wait_for_function("document.querySelectorAll('[data-testid=bot]').length === 1", timeout=120_000)
        wait_while_the_reply_grows(page, app)
        send(page, long_turn)  # with the first turn it no longer fits: the page says the turn was left out
        page.get_by_text("turn(s) were left out to fit the model's context").wait_for(timeout=60_000)
        wait_while_the_reply_grows(page, app)
        shot(page, "dropped-turns")
        send(page, "la " * 5000)
        page.get_by_text("The message is too long").wait_for(timeout=60_000)
        shot(page, "too-long")
    finally:
        app.stop()
