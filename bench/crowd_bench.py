"""Many users at once through the page (engine=openai, default settings) vs the same server read directly.

    .venv/bin/python bench/crowd_bench.py [--users 8 32 64] [--tokens 128] [--rate 25] [--runs 3] [--json FILE]

Two servers, each in its own process: tests/paced_server.py (every stream gets --rate tokens/s however many are
open, as a batching GPU engine gives) and `transformers serve --continuous-batching` on the trained tiny model
(tests/tinymodel.py). For each number of users, waves alternate between the page and the server read directly,
every user sending at the same moment:
- wall ratio: the page's wall time for all replies ÷ the direct wave's (goal ≤ 1.15 at 32 users);
- time to first token: p50/p95 of each user's first update holding reply text (goal p95 ≤ 1.0 s at 32);
- page CPU seconds per 1000 tokens forwarded; page RSS before the first wave and after the last;
- the client's own CPU (this process: cores used during the page waves), so a figure is not the client's limit.
Page users are read as the page's JavaScript reads them (bench/sse_reader: one join, one event stream).
Plus single-stream efficiency: tokens/s a gradio_client sees (submit → last update) ÷ the server's own stream
to a plain reader, alternating (goal ≥ 0.95).
"""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List

import psutil
from common import OUT, PYTHON, ROOT, child_env, clock, machine, median, write
from sse_reader import QueueReader

PROMPT = "Hello"
WAITING = "⏳"  # the page's queue notices start with it: they are not reply text
TRANSFORMERS = str(Path(PYTHON).with_name("transformers"))


def percentile(values: List[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(share * len(ordered)) - 1))]


class Source:
    """An OpenAI-compatible server in its own process."""

    def __init__(self, command: List[str], port: int, model: str, log: Path) -> None:
        self.port, self.model = port, model
        self.process = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, env=child_env())
        deadline = time.monotonic() + 300
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"{command[:3]} did not start: see {log}")
            time.sleep(0.3)

    def _healthy(self) -> bool:
        try:
            return self.get("/health").status == 200
        except OSError:
            return False

    def get(self, path: str) -> http.client.HTTPResponse:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(20)
        except subprocess.TimeoutExpired:
            self.process.kill()


def paced_source(rate: float, tokens: int, work: Path) -> Source:
    from apprunner import free_port

    port = free_port()
    command = [PYTHON, str(ROOT / "tests" / "paced_server.py"), "--rate", str(rate), "--tokens", str(tokens),
               "--port", str(port)]
    return Source(command, port, "paced-model", work / "paced.log")


def serve_source(work: Path) -> Source:
    """`transformers serve --continuous-batching` on the trained tiny chat model (built once, kept in bench/out)."""
    import tinymodel
    from apprunner import free_port

    model = OUT / "tiny-chat"
    if not (model / "model.safetensors").exists():
        tinymodel.build_chat_model(model)
    port = free_port()
    command = [TRANSFORMERS, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", "float32", "--continuous-batching",
               # A bounded paged KV cache (32k tokens, 16 MB for this model): left to size itself on the CPU, it
               # grew past 14 GB here and the kernel killed it.
               "--cb-block-size", "32", "--cb-num-blocks", "1024", "--cb-max-batch-tokens", "2048"]
    return Source(command, port, str(model), work / "serve.log")


def direct_stream(source: Source, tokens: int) -> dict:
    """The server's own stream, read with http.client: when the first text came, when it ended, how many pieces."""
    body = {"model": source.model, "messages": [{"role": "user", "content": PROMPT}], "stream": True,
            "max_tokens": tokens, "temperature": 0.0}
    started = clock()
    connection = http.client.HTTPConnection("127.0.0.1", source.port, timeout=300)
    connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
    first, pieces = None, 0
    for line in connection.getresponse():
        if line.startswith(b"data:") and b'"content"' in line:
            chunk = json.loads(line[5:], strict=False)
            if chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                pieces += 1
                first = first or clock()
    connection.close()
    ended = clock()
    return {"started": started, "first": (first or ended) - started, "ended": ended, "pieces": pieces}


def page_stream(reader: QueueReader, tokens: int) -> dict:
    """One user through the page: when the first reply text (not a queue notice) came, when the reply ended."""
    started = clock()
    first, text = None, ""
    for arrived, value in reader.stream(PROMPT, "", tokens, 0.0, 0.8, 1.0):
        text = value if isinstance(value, str) else ""
        if first is None and text and not text.startswith(WAITING):
            first = arrived
    ended = clock()
    return {"started": started, "first": (first or ended) - started, "ended": ended, "text": text}


def wave(users: int, one: Callable[[], dict]) -> dict:
    """`users` calls of one() released at the same moment; the wall time is the first start to the last end."""
    results: List[dict] = []
    errors: List[str] = []
    gate = threading.Barrier(users)
    me = psutil.Process()

    def run() -> None:
        gate.wait()
        try:
            results.append(one())
        except Exception as error:  # a failed reply is a figure too
            errors.append(f"{type(error).__name__}: {error}")

    threads = [threading.Thread(target=run) for _ in range(users)]
    cpu = sum(me.cpu_times()[:2])
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    cpu = sum(me.cpu_times()[:2]) - cpu
    if errors or not results:
        return {"errors": errors[:3], "failed": len(errors)}
    wall = max(r["ended"] for r in results) - min(r["started"] for r in results)
    return {"wall": wall, "firsts": [r["first"] for r in results], "results": results, "client_cpu": cpu,
            "failed": 0}


def measure_users(source: Source, app_url: str, page_pid: int, users: int, tokens: int, runs: int,
                  count: Callable[[dict], int]) -> dict:
    page = psutil.Process(page_pid)
    ratios, page_firsts, direct_firsts, cpu_per_1000, client_share, failed = [], [], [], [], [], 0
    all_walls: Dict[str, List[float]] = {"page": [], "direct": []}
    for run in range(runs):
        order = ("page", "direct") if run % 2 == 0 else ("direct", "page")
        walls: Dict[str, float] = {}
        for side in order:
            time.sleep(1.0)
            if side == "direct":
                got = wave(users, lambda: direct_stream(source, tokens))
                if got["failed"]:
                    raise RuntimeError(f"direct wave failed: {got['errors']}")
                direct_firsts += got["firsts"]
            else:
                reader = QueueReader(app_url, "/chat")  # read-only once built: each call has its own session
                before = sum(page.cpu_times()[:2])
                got = wave(users, lambda reader=reader: page_stream(reader, tokens))
                page_cpu = sum(page.cpu_times()[:2]) - before
                failed += got["failed"]
                if got["failed"]:
                    continue
                forwarded = sum(count(r) for r in got["results"])
                page_firsts += got["firsts"]
                cpu_per_1000.append(1000 * page_cpu / max(1, forwarded))
                client_share.append(got["client_cpu"] / got["wall"])
            walls[side] = got["wall"]
            all_walls[side].append(round(got["wall"], 2))
        if len(walls) == 2:
            ratios.append(walls["page"] / walls["direct"])
    return {
        "users": users, "runs": runs, "failed_page_replies": failed, "walls_s": all_walls,
        "wall_ratio": median(ratios) if ratios else None, "wall_ratios": [round(r, 3) for r in ratios],
        "page_first_p50_s": median(page_firsts) if page_firsts else None,
        "page_first_p95_s": percentile(page_firsts, 0.95) if page_firsts else None,
        "direct_first_p50_s": median(direct_firsts), "direct_first_p95_s": percentile(direct_firsts, 0.95),
        "page_cpu_s_per_1000_tokens": median(cpu_per_1000) if cpu_per_1000 else None,
        "client_cpu_cores": median(client_share) if client_share else None,
    }


def single_stream(source: Source, app_url: str, tokens: int, runs: int) -> dict:
    """tokens/s through gradio_client (submit → last update) ÷ the server's own stream, alternating."""
    from gradio_client import Client

    client = Client(app_url, verbose=False)
    ratios, pieces = [], []
    for run in range(runs + 1):
        time.sleep(0.3)
        order = ("page", "direct") if run % 2 == 0 else ("direct", "page")
        elapsed = {}
        for side in order:
            if side == "direct":
                got = direct_stream(source, tokens)
                elapsed[side] = got["ended"] - got["started"]
                pieces.append(got["pieces"])
            else:
                client.reset_session()
                started = clock()
                job = client.submit(PROMPT, "", tokens, 0.0, 0.8, 1.0, api_name="/chat")
                for _ in job:
                    pass
                job.result()
                elapsed[side] = clock() - started
        if run:  # the first pair warms up
            ratios.append(elapsed["direct"] / elapsed["page"])
    return {"stream_efficiency": median(ratios), "runs": [round(r, 3) for r in ratios],
            "tokens": median(pieces)}


def measure_source(name: str, source: Source, work: Path, users: List[int], tokens: int, runs: int) -> dict:
    from apprunner import AppProcess, render

    app_dir = render(work / name, engine="openai", engine_url=source.url, engine_model=source.model,
                     ui_language="en", validate_model_repo=False)
    app = AppProcess(app_dir, child_env(), work / f"{name}.app.log", python=PYTHON)
    try:
        app.wait_stage(("ready",))
        reference = direct_stream(source, tokens)["pieces"]  # greedy: every direct reply has this many pieces

        def count(result: dict) -> int:
            return result["text"].count("word") if name == "paced" else reference

        page_stream(QueueReader(app.url, "/chat"), tokens)  # warm-up
        page = psutil.Process(app.process.pid)
        rss_before = page.memory_info().rss
        figures = {"reply_tokens": reference, "single": single_stream(source, app.url, tokens, runs + 2),
                   "by_users": [measure_users(source, app.url, app.process.pid, n, tokens, runs, count)
                                for n in users]}
        time.sleep(2)
        figures["page_rss_mb"] = [round(rss_before / 2**20), round(page.memory_info().rss / 2**20)]
        return figures
    finally:
        app.stop()


def own_engine_stream(tokens: int, runs: int) -> dict:
    """Single-stream efficiency on the app's own engine (engine=transformers, CPU): bench/app_bench's measurement
    (gradio_client and the browser-like reader ÷ plain generate in its own process, rotating) on its own."""
    from app_bench import _stream, setup, start_app, wait_ready

    work = OUT / "crowd-own"
    world = setup(work)
    env = {"MODEL_REPO": Path(world["remote_root"] / "model.git").as_uri(), "MODEL_DIR": str(work / "weights"),
           "DTYPE": "float32", "HARDWARE": "cpu"}
    app = start_app(world["app"], env, work / "app.log")
    try:
        ready = wait_ready(app.url, app.process)
        got = _stream(ready["client"], app.url, work / "weights", tokens, runs)
    finally:
        app.stop()
    return {key: got[key] for key in ("stream_efficiency", "stream_ratios", "reader_stream_efficiency",
                                      "plain_tok_s", "http_tok_s", "params")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, nargs="+", default=[8, 32, 64])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rate", type=float, default=25.0, help="paced server: tokens/s per stream")
    parser.add_argument("--runs", type=int, default=3, help="alternating page/direct waves per user count")
    parser.add_argument("--sources", nargs="+", default=["paced", "serve", "own"], choices=["paced", "serve", "own"],
                        help="own: single-stream efficiency on the app's own engine (engine=transformers)")
    parser.add_argument("--json")
    args = parser.parse_args()
    work = OUT / "crowd-bench"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    flags = sorted({f for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile")
                    if f in Path("/proc/cpuinfo").read_text()})
    results: dict = {"machine": machine(), "cpu_flags": flags, "tokens": args.tokens, "rate": args.rate,
                     "load_average_before": os.getloadavg()}
    for name in args.sources:
        if name == "own":
            results["own"] = own_engine_stream(args.tokens, 2 * args.runs + 1)
            continue
        source = paced_source(args.rate, args.tokens, work) if name == "paced" else serve_source(work)
        try:
            results[name] = measure_source(name, source, work, args.users, args.tokens, args.runs)
        except Exception as error:  # keep the other sources' figures
            results[name] = {"error": f"{type(error).__name__}: {error}"}
        finally:
            source.stop()
        write(results, args.json)
    results["load_average_after"] = os.getloadavg()
    write(results, args.json)


if __name__ == "__main__":
    sys.exit(main())
