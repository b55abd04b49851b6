"""The page in front of an OpenAI-compatible server, against that server's own stream (issue: engines).

    .venv/bin/python bench/engines_bench.py [--tokens 128] [--runs 5] [--users 8] [--json FILE]

`transformers serve` (the real server that runs on this CPU) serves the endless benchmark model, so every reply
has exactly --tokens tokens. Figures, side by side in one run, alternating:
- stream: tokens/s the page streams (engine=openai, read over HTTP as the page's JavaScript does: bench/sse_reader;
  gradio_client, which polls every 50 ms, beside it) ÷ tokens/s the same server streams to the `openai` client
  directly, same prompt, greedy, same token count;
- first token: the page's first streamed update (browser-like reader) − the server's own first chunk;
- users: aggregate tokens/s of --users concurrent chats through the page, with the server in
  --continuous-batching mode, ÷ engine=transformers (the app's own engine process) at CONCURRENCY_LIMIT 1; the
  same at limit --users is reported beside it.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

from app_bench import PROMPT, _client, chat, start_app, wait_ready
from common import OUT, clock, endless_model, median, write
from sse_reader import QueueReader

TRANSFORMERS = str(Path(sys.executable).with_name("transformers"))


def serve(model: Path, port: int, batching: bool, log: Path) -> subprocess.Popen:
    command = [TRANSFORMERS, "serve", str(model), "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
               "--dtype", "float32"] + (["--continuous-batching"] if batching else [])
    server = subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200:
                return server
        except OSError:
            time.sleep(0.3)
    server.kill()
    raise RuntimeError("transformers serve did not start")


def direct(port: int, model: Path, tokens: int) -> dict:
    """The server's own stream, read by the openai client: first chunk with text, last chunk."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
    started = clock()
    first, pieces = None, 0
    stream = client.chat.completions.create(model=str(model), messages=[{"role": "user", "content": PROMPT}],
                                            max_tokens=tokens, temperature=0.0, stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces += 1
            first = first or clock()
    ended = clock()
    return {"first": (first or ended) - started, "elapsed": ended - started, "pieces": pieces}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def render_app(work: Path, name: str, **answers: str) -> Path:
    from apprunner import render

    return render(work / name, hardware="cpu", validate_model_repo=False, **answers)


def users_tok_s(url: str, tokens: int, users: int) -> float:
    """Aggregate tokens/s of `users` chats sent at once through the page."""
    clients = [_client(url) for _ in range(users)]
    done = []
    started = clock()
    threads = [threading.Thread(target=lambda c=c: done.append(chat(c, tokens))) for c in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if len(done) != users or not all(d["text"] for d in done):
        raise RuntimeError("a concurrent chat failed")
    return users * tokens / (clock() - started)


def measure(tokens: int, runs: int, users: int) -> dict:
    work = OUT / "engines-bench"
    shutil.rmtree(work, ignore_errors=True)  # fresh renders each run
    model = endless_model()
    port = free_port()
    results: dict = {"tokens": tokens, "runs": runs, "users_count": users}
    server = serve(model, port, batching=False, log=work.with_suffix(".serve.log"))
    try:
        app_dir = render_app(work, "openai", engine="openai", engine_url=f"http://127.0.0.1:{port}/v1",
                             engine_model=str(model))
        app = start_app(app_dir, {}, work.with_suffix(".app.log"))
        try:
            ready = wait_ready(app.url, app.process)
            client, reader = ready["client"], QueueReader(app.url, "/chat")
            chat(client, tokens)  # warm-up, both paths
            direct(port, model, tokens)
            page_rates, client_rates, direct_rates, page_first, direct_first = [], [], [], [], []
            for run in range(runs):
                order = ("page", "direct") if run % 2 == 0 else ("direct", "page")
                for side in order:
                    time.sleep(0.3)
                    if side == "page":  # the browser-like reader carries the figure; gradio_client beside it
                        streamed = reader.call(PROMPT, "", tokens, 0.0, 0.8, 1.0)
                        page_rates.append(tokens / streamed["elapsed"])
                        page_first.append(streamed["first"])
                        client_rates.append(tokens / chat(client, tokens)["elapsed"])
                    else:
                        got = direct(port, model, tokens)
                        direct_rates.append(tokens / got["elapsed"])
                        direct_first.append(got["first"])
            results.update(
                page_tok_s=median(page_rates), direct_tok_s=median(direct_rates),
                gradio_client_tok_s=median(client_rates),
                gradio_client_ratio=median([c / d for c, d in zip(client_rates, direct_rates)]),
                stream_ratio=median([p / d for p, d in zip(page_rates, direct_rates)]),
                stream_ratios=[round(p / d, 3) for p, d in zip(page_rates, direct_rates)],
                page_first_ms=median(page_first) * 1000, direct_first_ms=median(direct_first) * 1000,
                first_token_delta_ms=(median(page_first) - median(direct_first)) * 1000)
        finally:
            app.stop()
    finally:
        server.terminate()
        server.wait(20)
    results["users"] = _users(work, model, tokens, users)
    return results


def _users(work: Path, model: Path, tokens: int, users: int) -> dict:
    """Continuous batching behind the page vs the app's own engine at limit 1 and at limit `users`."""
    import tinymodel

    bare = OUT / "remote-small" / "model.git"
    if not (bare / "HEAD").exists():
        tinymodel.publish(model, bare)
    own = render_app(work, "own", model_repo=bare.as_uri())
    rates = {}
    for limit in (1, users):
        app = start_app(own, {"CONCURRENCY_LIMIT": str(limit), "MODEL_DIR": str(work / "weights"),
                              "DTYPE": "float32"}, work.with_suffix(f".own{limit}.log"))
        try:
            wait_ready(app.url, app.process)
            rates[f"engine_transformers_limit_{limit}"] = users_tok_s(app.url, tokens, users)
        finally:
            app.stop()
    port = free_port()
    server = serve(model, port, batching=True, log=work.with_suffix(".cb.log"))
    try:
        app_dir = render_app(work, "cb", engine="openai", engine_url=f"http://127.0.0.1:{port}/v1",
                             engine_model=str(model))
        app = start_app(app_dir, {"CONCURRENCY_LIMIT": str(users)}, work.with_suffix(".cbapp.log"))
        try:
            wait_ready(app.url, app.process)
            rates["transformers_serve_cb"] = users_tok_s(app.url, tokens, users)
        finally:
            app.stop()
    finally:
        server.terminate()
        server.wait(20)
    rates["cb_over_limit_1"] = rates["transformers_serve_cb"] / rates["engine_transformers_limit_1"]
    rates[f"limit_{users}_over_limit_1"] = (rates[f"engine_transformers_limit_{users}"]
                                            / rates["engine_transformers_limit_1"])
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--users", type=int, default=8)
    parser.add_argument("--json")
    args = parser.parse_args()
    write(measure(args.tokens, args.runs, args.users), args.json)


if __name__ == "__main__":
    main()
