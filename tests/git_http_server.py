"""A private git host for the tests: smart HTTP (``git http-backend`` via CGI) plus the git-lfs batch API.

Every request needs HTTP Basic auth with the given user and token (none when the token is empty). It serves the
bare repos under one folder (as pushed by ``tinymodel.publish``, whose LFS objects
live in ``<repo>.git/lfs/objects``), binds 127.0.0.1 only, and runs the standard
library's http.server in a thread. Also: a listener that accepts and never answers.
"""

from __future__ import annotations

import base64
import hmac
import json
import os
import re
import socket
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import List, Tuple

LFS_JSON = "application/vnd.git-lfs+json"
_BATCH = re.compile(r"^/(?P<repo>.+?\.git)/info/lfs/objects/batch$")
_OBJECT = re.compile(r"^/(?P<repo>.+?\.git)/info/lfs/objects/(?P<oid>[0-9a-f]{64})$")


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # keep test output quiet
        return None

    # -- plumbing

    def _authorised(self) -> bool:
        if not self.server.token:  # a public host
            self.server.seen.append((self.command, self.path, bool(self.headers.get("Authorization")), True))
            return True
        expected = "Basic " + base64.b64encode(f"{self.server.user}:{self.server.token}".encode()).decode()
        given = self.headers.get("Authorization", "")
        ok = hmac.compare_digest(given.encode(), expected.encode())
        self.server.seen.append((self.command, self.path, bool(given), ok))
        if not ok:
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Basic realm="test git host"')
            self.send_header("Content-Length", "0")
            self.end_headers()
        return ok

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    self.rfile.readline()
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    # -- git-lfs

    def _objects(self, repo: str) -> Path:
        return self.server.root / repo / "lfs" / "objects"

    def _batch(self, repo: str) -> None:
        request = json.loads(self._body() or b"{}")
        if self.server.batch_delay:  # a stalled LFS endpoint: the answer comes too late
            threading.Event().wait(self.server.batch_delay)
        if self.server.batch_status:
            self._send(self.server.batch_status, b'{"message": "internal error"}', LFS_JSON)
            return
        base = f"http://127.0.0.1:{self.server.server_address[1]}/{repo}/info/lfs/objects/"
        answers = []
        for item in request.get("objects", []):
            oid, size = str(item.get("oid", "")), item.get("size", 0)
            path = self._objects(repo) / oid[:2] / oid[2:4] / oid
            if request.get("operation") != "download":
                answers.append({"oid": oid, "size": size, "error": {"code": 403, "message": "read-only test host"}})
            elif path.is_file():
                answers.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"download": {"href": base + oid}}})
            else:
                answers.append({"oid": oid, "size": size, "error": {"code": 404, "message": "Object does not exist"}})
        self._send(200, json.dumps({"transfer": "basic", "objects": answers}).encode(), LFS_JSON)

    def _object(self, repo: str, oid: str) -> None:
        path = self._objects(repo) / oid[:2] / oid[2:4] / oid
        if not path.is_file():
            self._send(404, b"no such object", "text/plain")
            return
        self._send(200, path.read_bytes(), "application/octet-stream")

    # -- git smart HTTP through git http-backend (CGI)

    def _cgi(self) -> None:
        path, _, query = self.path.partition("?")
        body = self._body() if self.command == "POST" else b""
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "GIT_PROJECT_ROOT": str(self.server.root),
            "GIT_HTTP_EXPORT_ALL": "1",
            "REQUEST_METHOD": self.command,
            "PATH_INFO": path,
            "QUERY_STRING": query,
            "CONTENT_TYPE": self.headers.get("Content-Type", ""),
            "CONTENT_LENGTH": str(len(body)),
            "REMOTE_USER": self.server.user,
            "REMOTE_ADDR": "127.0.0.1",
        }
        for header, variable in (("Git-Protocol", "GIT_PROTOCOL"), ("Content-Encoding", "HTTP_CONTENT_ENCODING")):
            if self.headers.get(header):
                env[variable] = self.headers[header]
        done = subprocess.run(["git", "http-backend"], input=body, env=env, capture_output=True, check=False)
        raw = done.stdout
        split = raw.find(b"\r\n\r\n")
        head, rest = (raw[:split], raw[split + 4:]) if split >= 0 else raw.partition(b"\n\n")[::2]
        status, headers = 200, []
        for line in head.decode("latin-1").splitlines():
            name, _, value = line.partition(":")
            if name.lower() == "status":
                status = int(value.split()[0])
            elif name:
                headers.append((name.strip(), value.strip()))
        self.send_response(status)
        for name, value in headers:
            if name.lower() != "content-length":
                self.send_header(name, value)
        self.send_header("Content-Length", str(len(rest)))
        self.end_headers()
        self.wfile.write(rest)

    # -- routing

    def _route(self) -> None:
        if not self._authorised():
            return
        path = self.path.partition("?")[0]
        batch, obj = _BATCH.match(path), _OBJECT.match(path)
        if self.command == "POST" and batch:
            self._batch(batch.group("repo"))
        elif self.command == "GET" and obj:
            self._object(obj.group("repo"), obj.group("oid"))
        else:
            self._cgi()

    do_GET = _route
    do_POST = _route


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    batch_status = 0  # a test may set: answer every batch request with this HTTP status instead
    batch_delay = 0.0  # a test may set: seconds to sit on a batch request before answering

    def __init__(self, root: Path, user: str, token: str) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.root, self.user, self.token = root, user, token
        self.seen: List[Tuple[str, str, bool, bool]] = []  # (method, path, sent credentials, accepted)


class GitHTTPServer:
    """``with GitHTTPServer(folder, "alice", token) as host: host.url("tiny.git")``."""

    def __init__(self, root: Path, user: str, token: str) -> None:
        self.server = _Server(Path(root), user, token)
        self.thread = threading.Thread(target=self.server.serve_forever, name="git-http", daemon=True)

    @property
    def port(self) -> int:
        return self.server.server_address[1]

    @property
    def requests(self) -> List[Tuple[str, str, bool, bool]]:
        return list(self.server.seen)

    def object_downloads(self) -> int:
        """GETs of LFS objects: a check must make none."""
        return sum(1 for method, path, _, _ in self.server.seen if method == "GET" and _OBJECT.match(path))

    def url(self, repo: str) -> str:
        return f"http://127.0.0.1:{self.port}/{repo}"

    def __enter__(self) -> GitHTTPServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)


class SilentServer:
    """Accepts TCP connections on 127.0.0.1 and never sends a byte: a stalled host."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.held: List[socket.socket] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._accept, name="silent", daemon=True)

    @property
    def port(self) -> int:
        return self.sock.getsockname()[1]

    def _accept(self) -> None:
        self.sock.settimeout(0.2)
        while not self.stop.is_set():
            try:
                connection, _ = self.sock.accept()
            except OSError:
                continue
            self.held.append(connection)

    def __enter__(self) -> SilentServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(5)
        for connection in self.held:
            connection.close()
        self.sock.close()


def refused_port() -> Tuple[socket.socket, int]:
    """A port on 127.0.0.1 that is bound but not listening, so every connection is refused at once.

    Keep the returned socket open while the port is used, so no one else takes it.
    """
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    return sock, sock.getsockname()[1]

