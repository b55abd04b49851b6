"""Load, cancellation and bad input against one real app process with CONCURRENCY_LIMIT=2."""

from __future__ import annotations

import http.client
import json
import os
import socket
import statistics
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import faultkit
import psutil
import pytest
import tinymodel
from apprunner import AppProcess, render, stream_chat
from faultkit import wait_for

pytestmark = pytest.mark.e2e
LIMIT = 2
LONG = ("", 8192, 0.0, 0.8, 1.0)  # system prompt, max new tokens, temperature, top-p, repetition penalty
SHORT = ("", 24, 0.0, 0.8, 1.0)
FIGURES: dict = {}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("load")
    model = faultkit.quick_model(base / "model", hidden=256, layers=4, context=16384)
    remote = tinymodel.publish(model, base / "remote.git")
    app_dir = render(base / "out", model_repo=remote, hardware="cpu", ui_language="en", validate_model_repo=False)
    env = {"MODEL_DIR": str(base / "weights"), "CONCURRENCY_LIMIT": str(LIMIT)}
    app = AppProcess(app_dir, env, base / "app.log")
    try:
        app.wait_stage(("ready",))
        yield app
    finally:
        app.stop()
        if FIGURES:
            print("\nload figures:", json.dumps(FIGURES))


def client(app: AppProcess):
    from gradio_client import Client

    return Client(app.url, verbose=False)


def generating(app: AppProcess) -> int:
    return app.status()["generating"]


def start_long(app: AppProcess):
    """A reply far longer than the test: it generates until it is cancelled."""
    job = client(app).submit("la la la", *LONG, api_name="/chat")
    wait_for(lambda: len(job.outputs()) >= 3, 60, interval=0.05, what="a streaming reply")
    return job


def test_long_reply_keeps_generating_until_stopped(server: AppProcess):
    """The cancellation tests below rely on this: without a Stop, the reply runs on."""
    job = start_long(server)
    time.sleep(1.5)
    assert generating(server) == 1 and not job.done()
    job.cancel()
    wait_for(lambda: generating(server) == 0, 5, interval=0.05, what="generation to stop")


def _disconnect_mid_stream(app: AppProcess) -> None:
    """A browser tab closed mid-reply: open the SSE stream, read a few events, drop the connection."""
    body = json.dumps({"data": ["la la la", *LONG]}).encode()
    request = urllib.request.Request(app.url + "/gradio_api/call/chat", body, {"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    connection = http.client.HTTPConnection("127.0.0.1", app.port, timeout=60)
    connection.request("GET", f"/gradio_api/call/chat/{event_id}")
    stream, lines = connection.getresponse(), 0
    while lines < 6:
        if stream.readline().startswith(b"data:"):
            lines += 1
    connection.sock.shutdown(socket.SHUT_RDWR)
    connection.close()


def engine_child(app: AppProcess) -> psutil.Process:
    """The app's engine process (python -m xlab_chat.engines.worker)."""
    children = [c for c in psutil.Process(app.process.pid).children() if "xlab_chat.engines.worker" in c.cmdline()]
    assert len(children) == 1, children
    return children[0]


def open_pipes(*processes: psutil.Process) -> int:
    """Pipes the processes hold open (the page's and the engine's ends of their channel among them)."""
    count = 0
    for process in processes:
        for fd in Path(f"/proc/{process.pid}/fd").iterdir():
            try:
                count += os.readlink(fd).startswith("pipe:")
            except OSError:
                continue
    return count


def test_stop_or_disconnect_mid_stream_frees_the_slot_and_nothing_leaks(server: AppProcess):
    process = psutil.Process(server.process.pid)
    start_long(server).cancel()  # warm up: first-use allocations are not a leak
    wait_for(lambda: generating(server) == 0, 5, interval=0.05, what="warm-up stop")
    child = engine_child(server)
    baseline_threads, baseline_rss = process.num_threads(), process.memory_info().rss
    child_threads, child_rss, pipes = child.num_threads(), child.memory_info().rss, open_pipes(process, child)
    stops = []
    for round_ in range(20):
        if round_ % 2:
            job = start_long(server)
            began = time.monotonic()
            job.cancel()
        else:
            _disconnect_mid_stream(server)
            began = time.monotonic()
        stops.append(wait_for(lambda: generating(server) == 0, 10, interval=0.05, what="generation to stop"))
        assert time.monotonic() - began < 2.0 + 0.5, f"round {round_}: still generating after {stops[-1]:.2f} s"
    FIGURES["stop_s_max"] = round(max(stops), 2)
    time.sleep(1)
    threads, rss = process.num_threads(), process.memory_info().rss
    FIGURES["threads"] = [baseline_threads, threads]
    FIGURES["rss_mb"] = [round(baseline_rss / 2**20), round(rss / 2**20)]
    FIGURES["engine_threads"] = [child_threads, child.num_threads()]
    FIGURES["engine_rss_mb"] = [round(child_rss / 2**20), round(child.memory_info().rss / 2**20)]
    assert max(stops) < 2.0, stops
    assert threads <= baseline_threads + 2, (baseline_threads, threads)
    assert rss <= baseline_rss + 40 * 2**20, (baseline_rss, rss)
    assert engine_child(server).pid == child.pid  # the same child served every round: none leaked or restarted
    assert child.num_threads() <= child_threads + 2, (child_threads, child.num_threads())
    assert child.memory_info().rss <= child_rss + 40 * 2**20, (child_rss, child.memory_info().rss)
    assert open_pipes(process, child) == pipes, "pipes leaked"  # (sockets are the test clients' own keep-alives)


def test_twenty_concurrent_chats_all_complete_two_at_a_time(server: AppProcess):
    seen, done = [], threading.Event()

    def sample() -> None:
        probe = client(server)
        while not done.is_set():
            seen.append(probe.predict(api_name="/status")["generating"])
            time.sleep(0.05)

    def chat(index: int) -> tuple:
        began = time.monotonic()
        reply = client(server).predict(f"hello {index}", *SHORT, api_name="/chat")
        return time.monotonic() - began, reply

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        with ThreadPoolExecutor(20) as pool:
            results = list(pool.map(chat, range(20), timeout=240))
    finally:
        done.set()
        sampler.join(10)
    latencies = sorted(seconds for seconds, _ in results)
    FIGURES.update(requests=20, errors=0, max_generating=max(seen),
                   p50_s=round(statistics.median(latencies), 2),
                   p95_s=round(latencies[int(0.95 * len(latencies)) - 1], 2))
    assert all(isinstance(reply, str) and "failed" not in reply for _, reply in results), results
    assert max(seen) == LIMIT, seen  # both slots used, never more
    assert generating(server) == 0


def test_full_queue_is_refused_at_once_and_the_queued_still_complete(server: AppProcess):
    blockers = [start_long(server) for _ in range(LIMIT)]
    wait_for(lambda: generating(server) == LIMIT, 10, what="both slots busy")
    queue_size = 4 * LIMIT + 16  # settings.default_queue_size: the page's waiting line holds this many
    shared = client(server)
    queued = [shared.submit(f"queued {i}", *SHORT, api_name="/chat") for i in range(queue_size)]
    time.sleep(1)
    began = time.monotonic()
    assert "the queue is full (24 waiting)" in client(server).predict("one too many", *SHORT, api_name="/chat")
    FIGURES["overflow_answer_s"] = round(time.monotonic() - began, 2)
    assert time.monotonic() - began < 5
    for job in blockers:
        job.cancel()
    replies = [job.result(timeout=240) for job in queued]
    assert all(isinstance(reply, str) for reply in replies)
    assert stream_chat(server.url, "after the rush")[-1]


def raw_chat(app: AppProcess, data: list) -> str:
    """POST /gradio_api/call/chat with exactly this data (history slot included) and return the final event."""
    body = json.dumps({"data": data}).encode()
    request = urllib.request.Request(app.url + "/gradio_api/call/chat", body, {"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    events = urllib.request.urlopen(f"{app.url}/gradio_api/call/chat/{event_id}", timeout=120).read().decode()
    return events.strip().splitlines()[-1]


BAD_INPUTS = {
    "empty": "",
    "100k characters": "x" * 100_000,
    "control characters": "hi\x00\x07\x1b[31m\x08there\x7f",
    "html": "<script>alert('x')</script><img src=x onerror=alert(1)><b>bold</b>",
}


def test_bad_chat_input_gets_a_clear_answer_and_the_app_keeps_serving(server: AppProcess):
    replies = {name: client(server).predict(text, *SHORT, api_name="/chat") for name, text in BAD_INPUTS.items()}
    # httpx refuses to encode a lone surrogate, so send the JSON escape a browser or script could send.
    surrogate = raw_chat(server, ["hello \ud800 world", None, *SHORT])
    assert surrogate.startswith("data:"), surrogate
    replies["broken surrogate"] = json.loads(surrogate[len("data:"):])[0]
    assert replies["empty"] == "Please type a message."
    assert "too long" in replies["100k characters"] and "tokens" in replies["100k characters"]
    for name in ("control characters", "html", "broken surrogate"):
        assert isinstance(replies[name], str) and "failed" not in replies[name], (name, replies[name])
        assert "\x00" not in replies[name] and "\ud800" not in replies[name]
    for history in ([["only one"]], [{"role": "hacker", "content": 5}], {"not": "a list"}, [[1, 2, 3]], "text"):
        last = raw_chat(server, ["hello", history, *SHORT])
        assert last.startswith("data:"), last
        assert "Traceback" not in last
    assert "Traceback" not in server.log
    assert stream_chat(server.url, "still there?")[-1]
    assert generating(server) == 0


def test_simulated_oom_item_reaches_the_caller_and_the_engine_keeps_serving(app_modules: Path, tmp_path: Path):
    """OOM cannot happen on this CPU machine: the model's generate raises torch.cuda.OutOfMemoryError once."""
    import queue

    import torch
    from xlab_chat.engines.transformers_engine import Engine, Generation

    engine = Engine.load(faultkit.quick_model(tmp_path / "model"), "cpu", "float32", "native", 1)
    real_generate, calls = engine.model.generate, []

    def generate_oom_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real_generate(*args, **kwargs)

    engine.model.generate = generate_oom_once
    ids = engine.fit_prompt("", [], "hello", 8)[0]
    for expected in (torch.cuda.OutOfMemoryError, Generation.DONE):
        items: queue.Queue = queue.Queue()
        generation = engine.start(ids, items.put, 8, 0.0, 0.8, 1.0)
        assert generation.finished.wait(60)
        received = list(items.queue)
        last = received[-1]
        assert last is expected or isinstance(last, expected), received
        assert engine.active == 0
    assert len(calls) == 2
