"""A loopback proxy in front of a real OpenAI-compatible server (``transformers serve``) that adds what that
server lacks and the faults a deployment meets: an API key it enforces, 429s, a first byte that never comes,
a malformed event, a connection cut mid-stream, a model list of our choosing.

Requests are forwarded to the real server and its event stream is relayed line by line as it arrives, so
replies are the model's own. The proxy records each chat request body and whether its client hung up.
"""

from __future__ import annotations

import http.client
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import List, Optional


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet keep-alive handler that answers JSON: the base of the test servers that speak the OpenAI API."""

    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: object) -> None:
        return None

    def _reply(self, status: int, body: dict) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class _Handler(JSONHandler):
    server: _Proxy

    def _key_ok(self) -> bool:
        proxy = self.server
        self.server.seen_auth.append(self.headers.get("Authorization", ""))
        if proxy.key and self.headers.get("Authorization") != f"Bearer {proxy.key}":
            self._reply(401, {"error": {"message": "Incorrect API key provided.", "type": "invalid_request_error",
                                        "code": "invalid_api_key"}})
            return False
        return True

    def do_GET(self) -> None:
        if self.path.endswith("/health"):
            self._reply(200, {"status": "ok"})
            return
        if not self._key_ok():
            return
        if self.path.endswith("/v1/models") and self.server.models is not None:
            self._reply(200, {"object": "list", "data": [{"id": m, "object": "model"} for m in self.server.models]})
            return
        self._forward("GET", b"")

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        if not self._key_ok():
            return
        proxy = self.server
        proxy.chats.append(json.loads(body or b"{}"))
        if proxy.status_429:
            self._reply(429, {"error": {"message": "Rate limit reached", "type": "rate_limit_exceeded"}})
            return
        if proxy.stall:
            proxy.stalled.wait(120)  # accept, then never send a byte until the test ends
            return
        self._forward("POST", body)

    def _forward(self, method: str, body: bytes) -> None:
        proxy = self.server
        upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=120)
        headers = {"Content-Type": "application/json"}
        upstream.request(method, self.path, body=body or None, headers=headers)
        response = upstream.getresponse()
        self.send_response(response.status)
        self.send_header("Content-Type", response.getheader("Content-Type", "application/json"))
        self.send_header("Connection", "close")
        self.end_headers()
        lines = 0
        try:
            if proxy.malformed and method == "POST":
                self.wfile.write(b'data: {"choices": [{"delta": {"content": "\x01broken\n\n')
                self.wfile.write(b"data: {not json at all}\n\n")
            for line in iter(response.readline, b""):
                self.wfile.write(line)
                self.wfile.flush()
                lines += line.startswith(b"data:")
                if proxy.cut_after and lines >= proxy.cut_after:
                    self.connection.shutdown(2)  # the server "dies" mid-stream
                    return
        except OSError:  # our client hung up: Stop closes the stream
            proxy.client_hangups += 1
        finally:
            upstream.close()
            self.close_connection = True


class _Proxy(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, upstream_port: int, key: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.upstream_port, self.key = upstream_port, key
        self.chats: List[dict] = []
        self.seen_auth: List[str] = []
        self.models: Optional[List[str]] = None
        self.status_429 = self.stall = self.malformed = False
        self.cut_after = 0
        self.client_hangups = 0
        self.stalled = threading.Event()


class OpenAIProxy:
    def __init__(self, upstream_port: int, key: str = "") -> None:
        self.server = _Proxy(upstream_port, key)
        self.thread = threading.Thread(target=self.server.serve_forever, name="openai-proxy", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    def __enter__(self) -> OpenAIProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.stalled.set()
        self.server.shutdown()
        self.server.server_close()
