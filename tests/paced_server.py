"""An OpenAI-compatible chat server that streams at a known pace to any number of clients at once.

It stands in for a batching GPU engine (vLLM, LMDeploy): every stream gets ``rate`` tokens per second, however
many are open, unless ``slow_above`` is set, when the pace per stream falls as ``rate * slow_above / open``
once more than that many streams are open (a server that slows down under load). Each token is one SSE event
``word{i} ``, sent on an absolute schedule, so a stream of N tokens takes ``first_delay + N / rate`` seconds.

It counts what the tests and the benchmark need: streams open now and at most, streams finished, and streams
whose client hung up mid-reply. ``GET /stats`` returns them as JSON, so another process can read them.

Standard library only. Run it on its own (the benchmark does, so its CPU is not the page's or the client's):

    python tests/paced_server.py --rate 25 --tokens 128      # prints {"port": N} once it serves
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
import time
from http.server import ThreadingHTTPServer
from typing import Optional

from openai_proxy import JSONHandler  # beside this file, also when it runs as its own process

MODEL = "paced-model"


class _Handler(JSONHandler):
    server: _PacedServer

    def do_GET(self) -> None:
        if self.path.endswith("/health"):
            self._reply(200, {"status": "ok"})
        elif self.path.endswith("/v1/models"):
            self._reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model"}]})
        elif self.path.endswith("/stats"):
            self._reply(200, self.server.stats())
        else:
            self._reply(404, {"error": {"message": f"no route {self.path}"}})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        if not self.path.endswith("/chat/completions") or not body.get("stream"):
            self._reply(400, {"error": {"message": "this server only streams /v1/chat/completions"}})
            return
        tokens = min(int(body.get("max_tokens") or self.server.tokens), self.server.tokens)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        self.close_connection = True
        self.server.opened()
        finished = False
        try:
            self._stream(tokens)
            finished = True
        except OSError:  # the client hung up: the page cancelled this reply
            pass
        finally:
            self.server.closed(finished)

    def _stream(self, tokens: int) -> None:
        server = self.server
        due = time.monotonic() + server.first_delay
        for index in range(tokens):
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            self._event({"choices": [{"index": 0, "delta": {"content": f"word{index} "}, "finish_reason": None}]})
            due += 1.0 / server.pace()
        self._event({"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]})
        self.wfile.write(b"data: [DONE]\n\n")
        self.wfile.flush()

    def _event(self, chunk: dict) -> None:
        chunk.update(id="paced", object="chat.completion.chunk", model=MODEL)
        self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
        self.wfile.flush()


class _PacedServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # a wave of clients connecting at once must not be refused by the backlog

    def __init__(self, port: int, rate: float, tokens: int, first_delay: float, slow_above: Optional[int]) -> None:
        super().__init__(("127.0.0.1", port), _Handler)
        self.rate, self.tokens, self.first_delay, self.slow_above = rate, tokens, first_delay, slow_above
        self.lock = threading.Lock()
        self.open = self.peak = self.finished = self.hangups = 0

    def pace(self) -> float:
        """Tokens per second for each stream now."""
        if self.slow_above and self.open > self.slow_above:
            return self.rate * self.slow_above / self.open
        return self.rate

    def opened(self) -> None:
        with self.lock:
            self.open += 1
            self.peak = max(self.peak, self.open)

    def closed(self, finished: bool) -> None:
        with self.lock:
            self.open -= 1
            self.finished += finished
            self.hangups += not finished

    def stats(self) -> dict:
        with self.lock:
            return {"open": self.open, "peak": self.peak, "finished": self.finished, "hangups": self.hangups}


class PacedServer:
    """The server on a loopback port, in a thread of this process: ``with PacedServer(rate=25) as server:``."""

    def __init__(self, rate: float = 25.0, tokens: int = 128, first_delay: float = 0.05,
                 slow_above: Optional[int] = None, port: int = 0) -> None:
        self.server = _PacedServer(port, rate, tokens, first_delay, slow_above)
        self.thread = threading.Thread(target=self.server.serve_forever, name="paced-server", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stats(self) -> dict:
        return self.server.stats()

    def __enter__(self) -> PacedServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=25.0, help="tokens per second per stream")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per reply (max_tokens may ask fewer)")
    parser.add_argument("--first-delay", type=float, default=0.05, help="seconds before the first token")
    parser.add_argument("--slow-above", type=int, default=0, help="streams above which each one slows down")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = PacedServer(args.rate, args.tokens, args.first_delay, args.slow_above or None, args.port)
    print(json.dumps({"port": server.port}), flush=True)
    with contextlib.suppress(KeyboardInterrupt):
        server.server.serve_forever()


if __name__ == "__main__":
    main()
