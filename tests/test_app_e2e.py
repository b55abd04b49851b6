"""The rendered app as a real server: download, load, stream over HTTP, stop, restart offline, re-pull.

The module runs twice: on the dev stack (gradio 6, transformers 5) and on the oldest supported one
(gradio 4.44, transformers 4.46), with the same tiny model.
"""

from __future__ import annotations

import re
import shutil
import sys
import time
from pathlib import Path

import pytest
import tinymodel
from apprunner import AppProcess, render, stream_chat

pytestmark = pytest.mark.e2e
GREEDY = {"system_prompt": "", "max_new_tokens": 256, "temperature": 0.0, "top_p": 0.8, "repetition_penalty": 1.0}


@pytest.fixture(scope="module", params=["gradio6", "gradio4-legacy"])
def stack(request: pytest.FixtureRequest) -> str:
    """The interpreter that runs the app."""
    return request.getfixturevalue("legacy_python") if request.param == "gradio4-legacy" else sys.executable


@pytest.fixture(scope="module")
def world(model_remote: str, tmp_path_factory: pytest.TempPathFactory, stack: str) -> dict:
    """A rendered app pointed at a private copy of the remote, and the folder its model lands in."""
    base = tmp_path_factory.mktemp("e2e")
    remote = base / "remote.git"
    shutil.copytree(Path(model_remote.replace("file://", "")), remote)
    app = render(base / "out", model_repo=remote.as_uri(), hardware="cpu", ui_language="en", validate_model_repo=False)
    return {"base": base, "remote": remote, "app": app, "env": {"MODEL_DIR": str(base / "weights")}, "python": stack}


def first_lines(app: AppProcess) -> str:
    """What a newcomer reads of ``python app.py`` before scrolling: the first 30 lines."""
    return "\n".join(app.log.splitlines()[:30])


def says_where_the_page_and_the_model_are(app: AppProcess, world: dict) -> str:
    head = first_lines(app)
    assert head.startswith(f"The page will be at {app.url} in a few seconds")
    assert f"The model: {world['remote'].as_uri()} (revision main), downloaded once into" in head
    assert world["env"]["MODEL_DIR"] in head
    return head


@pytest.fixture(scope="module")
def server(world: dict):
    app = AppProcess(world["app"], world["env"], world["base"] / "first.log", world["python"])
    try:
        app.wait_stage(("ready",))
        yield app
    finally:
        app.stop()


def test_first_start_downloads_then_serves(server: AppProcess, world: dict, tiny_model: Path):
    state = server.status()
    assert state["stage"] == "ready" and state["device"].startswith("CPU")
    weights = Path(world["env"]["MODEL_DIR"]) / "model.safetensors"
    assert weights.read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert "[model] ready:" in server.log
    head = says_where_the_page_and_the_model_are(server, world)
    assert re.search(r"^\[model\] downloading [\d.,]+ MB \(\d+ files in LFS\)$", head, flags=re.M)
    assert f": chat at {server.url}" in head


def test_chat_with_only_a_message_streams_growing_updates(server: AppProcess):
    """A long reply arrives as several growing updates (the page sends them at a cadence, so a reply shorter than
    one beat can come in two: its first token, then the rest)."""
    updates = stream_chat(server.url, tinymodel.STORY, system="", max_new_tokens=200, temperature=0.0, top_p=0.8,
                          repetition_penalty=1.0)
    assert len(updates) >= 3
    assert all(later.startswith(earlier) and len(later) > len(earlier) for earlier, later in zip(updates, updates[1:]))
    assert updates[-1] and "<|im_end|>" not in updates[-1] and "<|im_start|>" not in updates[-1]


def test_greedy_reply_is_the_same_twice_and_ends_cleanly(server: AppProcess):
    first = stream_chat(server.url, tinymodel.GREETING, **GREEDY)[-1]
    second = stream_chat(server.url, tinymodel.GREETING, **GREEDY)[-1]
    assert first == second == tinymodel.GREETING_REPLY


def test_cancel_stops_generation_within_two_seconds(server: AppProcess):
    from gradio_client import Client

    job = Client(server.url, verbose=False).submit(tinymodel.STORY, "", 3000, 0.0, 0.8, 1.0, api_name="/chat")
    deadline = time.monotonic() + 60
    while len(job.outputs()) < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.status()["generating"] == 1  # mid-reply, far from its 3000 tokens
    cancelled_at = time.monotonic()
    job.cancel()
    while server.status()["generating"] and time.monotonic() - cancelled_at < 10:
        time.sleep(0.05)
    assert server.status()["generating"] == 0
    assert time.monotonic() - cancelled_at < 2.0
    assert stream_chat(server.url, tinymodel.GREETING, **GREEDY)[-1] == tinymodel.GREETING_REPLY  # the slot is free


def test_restart_with_the_remote_gone_serves_from_the_local_copy(server: AppProcess, world: dict):
    server.stop()
    hidden = world["remote"].with_name("moved-away.git")
    world["remote"].rename(hidden)
    app = AppProcess(world["app"], world["env"], world["base"] / "offline.log", world["python"])
    try:
        app.wait_stage(("ready",))
        head = says_where_the_page_and_the_model_are(app, world)
        assert "[model] using the verified local copy in" in head and "(no download)" in head
        assert "[model] downloading" not in app.log and f"chat at {app.url}" in head
        assert stream_chat(app.url, tinymodel.GREETING, **GREEDY)[-1] == tinymodel.GREETING_REPLY
    finally:
        app.stop()
        hidden.rename(world["remote"])


def test_pointer_file_left_in_place_is_pulled_again_not_loaded(world: dict, tiny_model: Path):
    weights = Path(world["env"]["MODEL_DIR"]) / "model.safetensors"
    size = weights.stat().st_size
    weights.unlink()
    weights.write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'a' * 64}\nsize {size}\n")
    app = AppProcess(world["app"], world["env"], world["base"] / "repull.log", world["python"])
    try:
        app.wait_stage(("ready",))
        assert "local copy rejected" in app.log and "pointer" in app.log
        assert weights.read_bytes() == (tiny_model / "model.safetensors").read_bytes()
        assert stream_chat(app.url, tinymodel.GREETING, **GREEDY)[-1] == tinymodel.GREETING_REPLY
    finally:
        app.stop()


def test_bad_repo_keeps_serving_and_reports_the_failure(world: dict):
    env = {**world["env"], "MODEL_DIR": str(world["base"] / "never"),
           "MODEL_REPO": (world["base"] / "missing.git").as_uri()}
    app = AppProcess(world["app"], env, world["base"] / "failed.log", world["python"])
    try:
        state = app.wait_stage(("failed",))
        assert "does not exist" in state["error"] and "model_repo" in state["error"].lower()
        reply = stream_chat(app.url, "hello")[-1]
        assert "could not start" in reply
        assert "Traceback" not in app.log
        head = first_lines(app)
        assert head.startswith(f"The page will be at {app.url} in a few seconds")
        assert "ERROR: the model repo check failed" in head
        assert "The page still opens and shows this error: fix the cause, then start the app again." in head
    finally:
        app.stop()
