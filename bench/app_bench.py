"""The rendered app as a real ``python app.py`` server, against plain generate, side by side.

The model comes from a bare git-LFS repo served over loopback HTTP by the tests' git host, with a byte
counter on its socket writes, so the first start really downloads and a restart's traffic is measured.

  stream efficiency   tokens/s a gradio_client sees (submit → last update) ÷ plain generate tokens/s; the same
                      for the browser-like reader (sse_reader.py)
  time to first token first streamed update over HTTP − the direct generate's first shown token, for both
                      readers (gradio_client checks for messages every 50 ms; the page reacts on arrival)
  warm start          ``python app.py`` → first reply (model on disk) ÷ bare import + load + one token
  no-op restart       bytes the remote served during each warm start
  concurrency         4 clients at once against CONCURRENCY_LIMIT 1, 2 and 4 (three servers, bursts alternate)

Usage: .venv/bin/python bench/app_bench.py [--tokens 128] [--runs 5] [--starts 3]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from pathlib import Path
from typing import Dict, List

import psutil
from common import BENCH, CHILD_ENV, OUT, PYTHON, clock, endless_model, median, write

PROMPT = "Hello"
USER, TOKEN = "bench", "bench-token"
GREEDY = ("", None, 0.0, 0.8, 1.0)  # system prompt, max_new_tokens (filled in), temperature, top_p, repetition


class CountingHost:
    """tests/git_http_server.GitHTTPServer, with every byte written to a client socket counted."""

    def __init__(self, root: Path) -> None:
        import git_http_server

        class Counting(git_http_server._Handler):
            def setup(self) -> None:
                super().setup()
                self.wfile = _CountingWriter(self.wfile, host)

        host = self
        self.bytes = 0
        self.lock = threading.Lock()
        self.inner = git_http_server.GitHTTPServer(root, USER, TOKEN)
        self.inner.server.RequestHandlerClass = Counting

    def add(self, count: int) -> None:
        with self.lock:
            self.bytes += count

    def url(self, repo: str) -> str:
        return self.inner.url(repo)

    @property
    def requests(self) -> int:
        return len(self.inner.requests)

    def __enter__(self) -> CountingHost:
        self.inner.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.inner.__exit__(*exc)


class _CountingWriter:
    def __init__(self, inner: object, host: CountingHost) -> None:
        self.inner, self.host = inner, host

    def write(self, data: bytes) -> int:
        written = self.inner.write(data)
        self.host.add(len(data))
        return written

    def __getattr__(self, name: str) -> object:
        return getattr(self.inner, name)


class Baseline:
    """bench/worker.py baseline: the same model, prompt and greedy settings through plain generate."""

    def __init__(self, folder: Path, tokens: int) -> None:
        self.process = subprocess.Popen([PYTHON, str(BENCH / "worker.py"), "baseline", str(folder), PROMPT,
                                         str(tokens)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=subprocess.DEVNULL, text=True, env=_env({}))
        self.info = self._read()

    def _read(self) -> dict:
        while True:
            line = self.process.stdout.readline()
            if not line:
                raise RuntimeError("the baseline worker died")
            if line.startswith("{"):
                return json.loads(line)

    def ask(self, command: str) -> dict:
        self.process.stdin.write(command + "\n")
        self.process.stdin.flush()
        return self._read()

    def close(self) -> None:
        self.process.stdin.write("quit\n")
        self.process.stdin.close()
        self.process.wait(30)


def _env(extra: dict) -> dict:
    import os

    return {**os.environ, **CHILD_ENV, **extra}


def _client(url: str):
    from gradio_client import Client

    return Client(url, verbose=False)


def chat(client: object, tokens: int, message: str = PROMPT) -> dict:
    """One /chat call: when it was sent, when the first text and the last update came, the final text."""
    args = _args(tokens)
    # A new session per request: gradio keeps /chat's history per session, and a growing prompt is not the same work.
    client.reset_session()
    started = clock()
    job = client.submit(message, *args, api_name="/chat")
    first = None
    text = ""
    for update in job:
        if first is None and update:
            first = clock()
        text = update
    text = job.result() or text
    ended = clock()
    return {"started": started, "first": (first or ended) - started, "elapsed": ended - started, "text": text}


def start_app(app: Path, env: dict, log: Path):
    from apprunner import AppProcess

    return AppProcess(app, _env(env), log, python=PYTHON)


def wait_ready(url: str, process: subprocess.Popen, timeout: float = 300) -> Dict[str, float]:
    """Seconds from now until the page serves and until /status says ready."""
    started = clock()
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError("the app exited")
        try:
            urllib.request.urlopen(url + "/config", timeout=2).read()
            break
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)
    serving = clock() - started
    client = _client(url)
    while True:
        state = client.predict(api_name="/status")
        if state["stage"] == "ready":
            return {"serving_s": serving, "ready_s": clock() - started, "client": client}
        if state["stage"] == "failed" or time.monotonic() > deadline:
            raise RuntimeError(f"the app did not start: {state}")
        time.sleep(0.1)


def setup(work: Path) -> Dict[str, object]:
    """The endless model in a bare LFS repo, and the template rendered into work/."""
    import tinymodel
    from apprunner import render

    model = endless_model()
    remote_root = OUT / "remote-small"
    bare = remote_root / "model.git"
    if not (bare / "HEAD").exists():
        shutil.rmtree(remote_root, ignore_errors=True)
        remote_root.mkdir(parents=True)
        tinymodel.publish(model, bare)
    shutil.rmtree(work, ignore_errors=True)
    app = render(work / "render", model_repo=bare.as_uri(), hardware="cpu", validate_model_repo=False)
    return {"model": model, "remote_root": remote_root, "app": app}


def measure(tokens: int = 128, runs: int = 5, starts: int = 3, clients: int = 4) -> dict:
    work = OUT / "app-bench"
    world = setup(work)
    app = world["app"]
    weights = work / "weights"
    results: dict = {"tokens": tokens, "runs": runs, "starts": starts, "clients": clients}
    with CountingHost(world["remote_root"]) as host:
        env = {"MODEL_REPO": host.url("model.git"), "MODEL_REPO_USER": USER, "MODEL_REPO_TOKEN": TOKEN,
               "MODEL_DIR": str(weights), "DTYPE": "float32", "HARDWARE": "cpu"}

        # First start: a real download over HTTP.
        started = clock()
        server = start_app(app, env, work / "first.log")
        try:
            ready = wait_ready(server.url, server.process)
            results["first_start"] = {"ready_s": clock() - started, "bytes": host.bytes,
                                      "weight_bytes": sum(p.stat().st_size for p in weights.glob("*.safetensors"))}
            results.update(_stream(ready["client"], server.url, weights, tokens, runs))
        finally:
            server.stop()

        results.update(_warm_starts(app, env, weights, host, starts, work))
        results.update(_crash_recovery(app, env, work, starts, results["warm_app_s"]))
        results["concurrency"] = _concurrency(app, env, work, tokens, clients, results.get("expected_text"))
    return results


def _stream(client: object, url: str, weights: Path, tokens: int, runs: int) -> dict:
    """Rotate plain generate (its own process, main thread), gradio_client and the browser-like reader."""
    from sse_reader import QueueReader

    reader, reader_status = QueueReader(url, "/chat"), QueueReader(url, "/status")
    baseline = Baseline(weights, tokens)
    try:
        info = baseline.info
        if info["tokens"] != tokens or info["stop_ids_seen"]:
            raise RuntimeError(f"the bench model stopped early or produced a stop id: {info}")
        chat(client, tokens)  # warm-up: the app's worker thread and its OpenMP pool
        plain: List[float] = []
        first_plain: List[float] = []
        seen: Dict[str, Dict[str, List[float]]] = {side: {"elapsed": [], "first": [], "floor": []}
                                                   for side in ("client", "reader")}
        matches = {"client": 0, "reader": 0}

        def direct() -> None:
            time.sleep(0.5)  # let the other process's OpenMP threads stop spinning
            plain.append(baseline.ask("run")["elapsed"])
            first_plain.append(baseline.ask("first")["elapsed"])

        def over_http(side: str) -> None:
            time.sleep(0.5)
            started = clock()
            if side == "client":  # the HTTP + queue round trip of an endpoint that does nothing
                client.predict(api_name="/status")
            else:
                reader_status.call()
            seen[side]["floor"].append(clock() - started)
            time.sleep(0.2)
            done = chat(client, tokens) if side == "client" else reader.call(PROMPT, *_args(tokens))
            seen[side]["elapsed"].append(done["elapsed"])
            seen[side]["first"].append(done["first"])
            problem = reply_problem(done["text"])
            if problem:
                raise RuntimeError(f"{side}: {problem}")
            matches[side] += done["text"] == info["text"]

        steps = [direct, lambda: over_http("client"), lambda: over_http("reader")]
        for index in range(runs):  # rotate, so that no side always runs first or after the same neighbour
            for step in steps[index % 3:] + steps[:index % 3]:
                step()
    finally:
        baseline.close()
    out = {
        "params": info["params"], "prompt_tokens": info["prompt_tokens"], "expected_text": info["text"],
        "first_visible_token": info["first_visible"], "plain_tok_s": tokens / median(plain),
        "ttft_plain_ms": 1000 * median(first_plain),
    }
    for side, prefix in (("client", ""), ("reader", "reader_")):
        got = seen[side]
        ratios = [p / h for p, h in zip(plain, got["elapsed"])]  # (tokens/h) / (tokens/p)
        out.update({
            f"{prefix}http_tok_s": tokens / median(got["elapsed"]),
            f"{prefix}stream_efficiency": median(ratios), f"{prefix}stream_ratios": ratios,
            f"{prefix}same_text_as_plain": f"{matches[side]}/{runs}",
            f"{prefix}ttft_http_ms": 1000 * median(got["first"]),
            f"{prefix}ttft_delta_ms": 1000 * median([h - p for h, p in zip(got["first"], first_plain)]),
            f"{prefix}status_round_trip_ms": 1000 * median(got["floor"]),
        })
    return out


def _args(tokens: int) -> list:
    args = list(GREEDY)
    args[1] = tokens
    return args


def _bare_start(weights: Path) -> float:
    """Spawn → the bare script's answer line (its exit is not counted, nor is the app's)."""
    started = clock()
    process = subprocess.Popen([PYTHON, str(BENCH / "worker.py"), "bare", str(weights)], stdout=subprocess.PIPE,
                               stderr=subprocess.DEVNULL, text=True, env=_env({}))
    for line in process.stdout:
        if line.startswith("{"):
            break
    elapsed = clock() - started
    process.wait(60)
    if process.returncode != 0:
        raise RuntimeError("the bare script failed")
    return elapsed


def _warm_starts(app: Path, env: dict, weights: Path, host: CountingHost, starts: int, work: Path) -> dict:
    apps, bares, served, requests, phases, page_rss, page_torch = [], [], [], [], [], [], []
    for index in range(starts):
        time.sleep(1)
        bares.append(_bare_start(weights))
        time.sleep(1)
        before_bytes, before_requests = host.bytes, host.requests
        started = clock()
        server = start_app(app, env, work / f"warm-{index}.log")
        try:
            ready = wait_ready(server.url, server.process)
            reply = chat(ready["client"], 1)
            apps.append(clock() - started)
            page = psutil.Process(server.process.pid)
            page_rss.append(page.memory_info().rss)
            page_torch.append("libtorch" in Path(f"/proc/{page.pid}/maps").read_text(errors="replace"))
            phases.append({"serving_s": ready["serving_s"], "ready_s": ready["ready_s"], "reply_s": apps[-1]})
            if not reply["text"]:
                raise RuntimeError("the warm app gave an empty reply")
        finally:
            server.stop()
        served.append(host.bytes - before_bytes)
        requests.append(host.requests - before_requests)
    import_gradio = _import_time("import gradio")
    import_torch = _import_time("import torch, transformers")
    return {
        "warm_app_s": median(apps), "bare_s": median(bares),
        "warm_start": median([a / b for a, b in zip(apps, bares)]),
        "warm_phases": {key: median([p[key] for p in phases]) for key in phases[0]},
        "import_gradio_s": import_gradio, "import_torch_transformers_s": import_torch,
        "restart_bytes": max(served), "restart_requests": max(requests),
        "page_rss_mb": round(median(page_rss) / 2**20), "page_maps_torch": any(page_torch),
    }


def _crash_recovery(app: Path, env: dict, work: Path, starts: int, warm_app_s: float) -> dict:
    """kill -9 the engine process of a ready app: seconds until a one-token chat answers again ÷ a warm start.
    One crash per app start (a second crash within a minute is refused as a crash loop, by design)."""
    recoveries = []
    for index in range(starts):
        server = start_app(app, env, work / f"crash-{index}.log")
        try:
            ready = wait_ready(server.url, server.process)
            engine = [c for c in psutil.Process(server.process.pid).children()
                      if "xlab_chat.engines.worker" in " ".join(c.cmdline())][0]
            time.sleep(1)
            started = clock()
            engine.kill()
            while ready["client"].predict(api_name="/status")["stage"] != "restarting":
                time.sleep(0.02)
            while ready["client"].predict(api_name="/status")["stage"] != "ready":
                time.sleep(0.05)
            if not chat(ready["client"], 1)["text"]:
                raise RuntimeError("no reply after the restart")
            recoveries.append(clock() - started)
        finally:
            server.stop()
    return {"crash_to_reply_s": median(recoveries), "crash_runs_s": [round(r, 2) for r in recoveries],
            "crash_over_warm": median(recoveries) / warm_app_s}


def _import_time(statement: str, runs: int = 3) -> float:
    times = []
    for _ in range(runs):
        started = clock()
        subprocess.run([PYTHON, "-c", statement], env=_env({}), check=True, capture_output=True)
        times.append(clock() - started)
    return median(times)


def _concurrency(app: Path, env: dict, work: Path, tokens: int, clients: int, expected: object,
                 limits: tuple = (1, 2, 4), rounds: int = 2) -> dict:
    """Three servers up at once; each round sends a burst of clients to each in turn."""
    servers = {limit: start_app(app, {**env, "CONCURRENCY_LIMIT": str(limit)}, work / f"limit-{limit}.log")
               for limit in limits}
    rates: Dict[int, List[float]] = {limit: [] for limit in limits}
    errors: Dict[int, List[str]] = {limit: [] for limit in limits}
    same: Dict[int, List[bool]] = {limit: [] for limit in limits}
    try:
        handles = {limit: [wait_ready(s.url, s.process)["client"]] for limit, s in servers.items()}
        for limit, server in servers.items():
            handles[limit] += [_client(server.url) for _ in range(clients - 1)]
            _burst(handles[limit], 8, None, [], [])  # warm every worker thread
        for _ in range(rounds):
            for limit in limits:
                time.sleep(1)
                rates[limit].append(_burst(handles[limit], tokens, expected, errors[limit], same[limit]))
    finally:
        for server in servers.values():
            server.stop()
    first = limits[0]
    return {limit: {"tok_s": median(rates[limit]), "errors": errors[limit], "replies": len(same[limit]),
                    "same_text_as_plain": sum(same[limit]),
                    "vs_first": median([r / f for r, f in zip(rates[limit], rates[first])])} for limit in limits}


def _burst(clients: list, tokens: int, expected: object, errors: list, same: list) -> float:
    """All clients submit at once; total tokens/s from the first submit to the last reply."""
    done: List[dict] = []

    def one(client: object) -> None:
        try:
            done.append(chat(client, tokens))
        except Exception as error:  # reported, not raised: the figure is "no errors"
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=one, args=(c,)) for c in clients]
    started = clock()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = clock() - started
    for reply in done:
        problem = reply_problem(reply["text"])
        if problem:
            errors.append(problem)
    same.extend(reply["text"] == expected for reply in done)
    return tokens * len(done) / elapsed


def reply_problem(text: object) -> str:
    """Why a reply is not a model reply: empty, a failure note or a status line instead of text."""
    if not isinstance(text, str) or not text:
        return f"empty or non-text reply: {text!r}"
    if "⚠️" in text or text.startswith(("⏳", "❌", "Please")):
        return f"not a model reply: {text[:80]!r}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--starts", type=int, default=3)
    args = parser.parse_args()
    results = measure(args.tokens, args.runs, args.starts)
    results.pop("expected_text", None)
    write(results, args.json)


if __name__ == "__main__":
    main()
