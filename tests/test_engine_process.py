"""The model runs in its own process: real app processes, real kills.

The page process serves HTTP and never imports torch; the engine child loads and
generates. Killing the child mid-reply ends that reply with a message and the
model comes back from the verified local copy with no network; killing the page
takes the child with it; a child that dies while loading is not restarted in a loop.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tinymodel
from apprunner import AppProcess, render
from conftest import TEMPLATE_APP
from faultkit import wait_for

pytestmark = pytest.mark.e2e
GREEDY = ("", 256, 0.0, 0.8, 1.0)  # system prompt, max new tokens, temperature, top-p, repetition penalty
RAMBLE = ("", 3000, 0.0, 0.8, 1.0)


def engine_children(pid: int) -> list:
    try:
        return [c for c in psutil.Process(pid).children() if "xlab_chat.engines.worker" in " ".join(c.cmdline())]
    except psutil.NoSuchProcess:
        return []


def maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text(errors="replace")


@pytest.fixture()
def app(tiny_model: Path, tmp_path: Path):
    """A ready app on a private copy of the remote, which the test may take away."""
    bare = tmp_path / "remote.git"
    shutil.copytree(Path(tinymodel.publish(tiny_model, tmp_path / "origin.git").replace("file://", "")), bare)
    folder = render(tmp_path / "out", model_repo=bare.as_uri(), hardware="cpu", ui_language="en",
                    validate_model_repo=False)
    process = AppProcess(folder, {"MODEL_DIR": str(tmp_path / "weights")}, tmp_path / "app.log")
    try:
        process.wait_stage(("ready",))
        yield process, bare
    finally:
        process.stop()


def chat(url: str, message: str, params: tuple = GREEDY) -> str:
    from gradio_client import Client

    return Client(url, verbose=False).predict(message, *params, api_name="/chat")


def test_page_process_never_imports_torch(app):
    process, _ = app
    children = engine_children(process.process.pid)
    assert len(children) == 1
    assert not maps_torch(process.process.pid) and maps_torch(children[0].pid)
    rss = psutil.Process(process.process.pid).memory_info().rss
    print(f"[page process RSS {rss / 2**20:.0f} MB]")
    assert rss < 400 * 2**20


def test_the_page_modules_import_no_torch():
    probe = ("import sys; sys.path.insert(0, sys.argv[1]); import xlab_chat, xlab_chat.startup, xlab_chat.page.ui;"
             " print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers')))")
    done = subprocess.run([sys.executable, "-c", probe, str(TEMPLATE_APP)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_engine_killed_mid_reply_ends_it_clearly_and_comes_back_without_the_network(app):
    from gradio_client import Client

    process, bare = app
    shutil.move(str(bare), str(bare.with_name("gone.git")))  # a restart must not need the remote
    first = engine_children(process.process.pid)[0]
    job = Client(process.url, verbose=False).submit(tinymodel.STORY, *RAMBLE, api_name="/chat")
    wait_for(lambda: len(job.outputs()) >= 3, 60, interval=0.05, what="a streaming reply")
    killed_at = time.monotonic()
    os.kill(first.pid, signal.SIGKILL)
    reply = job.result(timeout=30)
    assert "The model process stopped before this reply was finished" in reply, reply
    stages = []
    wait_for(lambda: stages.append(process.status()["stage"]) or stages[-1] == "ready", 120, interval=0.1,
             what="ready again")
    back_in = time.monotonic() - killed_at
    print(f"[crash -> ready again in {back_in:.1f} s; stages seen {sorted(set(stages))}]")
    assert "restarting" in stages
    assert chat(process.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY
    second = engine_children(process.process.pid)
    assert len(second) == 1 and second[0].pid != first.pid
    assert "killed by SIGKILL" in process.log

    # A second crash within a minute is a crash loop: the page shows the failure, no more restarts.
    os.kill(second[0].pid, signal.SIGKILL)
    wait_for(lambda: process.status()["stage"] == "failed", 30, what="the failure")
    state = process.status()
    assert "twice within 60 s" in state["error"] and "restart the app" in state["error"]
    time.sleep(2)
    assert engine_children(process.process.pid) == []
    assert chat(process.url, tinymodel.GREETING) == "The model could not start; see the error on the page."


def test_killing_the_page_takes_the_engine_with_it_within_five_seconds(app):
    process, _ = app
    child = engine_children(process.process.pid)[0]
    process.process.kill()
    process.process.wait(10)
    start = time.monotonic()
    gone = wait_for(lambda: not child.is_running() or child.status() == psutil.STATUS_ZOMBIE, 5, interval=0.05,
                    what="the engine process to exit")
    print(f"[engine gone {gone:.2f} s after the page]")
    assert time.monotonic() - start < 5


def test_a_model_that_kills_its_process_while_loading_fails_once_with_the_fix(tiny_model: Path, tmp_path: Path):
    """A real repo whose remote code kills the interpreter that imports it: the engine dies on every load."""
    folder = tmp_path / "deadly"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_deadly.DeadlyForCausalLM"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_deadly.py").write_text("import os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n")
    remote = tinymodel.publish(folder, tmp_path / "deadly.git")
    app_dir = render(tmp_path / "out", model_repo=remote, hardware="cpu", ui_language="en", loader="remote-code",
                     validate_model_repo=False)
    process = AppProcess(app_dir, {"MODEL_DIR": str(tmp_path / "weights")}, tmp_path / "app.log")
    try:
        process.wait_serving()
        wait_for(lambda: process.status()["stage"] == "failed", 120, what="the failure")
        error = process.status()["error"]
        assert "ended while loading the model" in error and "killed by SIGKILL" in error and "memory" in error
        time.sleep(3)
        assert process.status()["stage"] == "failed"  # no restart loop
        assert process.log.count("[engine] the model process ended") == 1
        assert engine_children(process.process.pid) == []
    finally:
        process.stop()


def test_the_engine_process_answers_a_chat_it_cannot_serve_and_keeps_reading(app_modules):
    """A chat that reaches the engine before its model (a restart race) gets an error, and the process still
    reads its commands: it exits at once when its stdin closes."""
    env = {**os.environ, "PYTHONPATH": str(app_modules)}
    child = subprocess.Popen([sys.executable, "-m", "xlab_chat.engines.worker"], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, env=env)
    try:
        for request_id in (1, 2):
            message = {"kind": "chat", "id": request_id, "system": "", "history": [], "message": "hi",
                       "max_new_tokens": 4, "temperature": 0.0, "top_p": 0.8, "repetition_penalty": 1.0}
            child.stdin.write(json.dumps(message).encode() + b"\n")
            child.stdin.flush()
            event = json.loads(child.stdout.readline())
            assert event == {"kind": "error", "id": request_id, "type": "EngineNotReady",
                             "error": "the model is not loaded yet"}
        child.stdin.close()
        assert child.wait(10) == 0
    finally:
        child.kill()
