"""Tools for the fault, load and secret tests: a slow or stalling LFS host, a bigger model repo, process probes.

The host is the tests' own smart-HTTP + LFS server (git_http_server) with the object
download slowed to a set rate, able to stall after a set number of bytes, honouring
``Range`` (so git-lfs can resume) and counting what it was asked for.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import re
import shutil
import threading
import time
from http.server import ThreadingHTTPServer
from pathlib import Path
from typing import Dict, List, Optional

import psutil
import tinymodel
from git_http_server import GitHTTPServer, _Handler, _Server

_RANGE = re.compile(r"bytes=(\d+)-")


class _SlowHandler(_Handler):
    server: _FaultServer

    def _batch(self, repo: str) -> None:
        with self.server.count_lock:
            self.server.batches += 1
        super()._batch(repo)

    def _object(self, repo: str, oid: str) -> None:
        path = self._objects(repo) / oid[:2] / oid[2:4] / oid
        if not path.is_file():
            self._send(404, b"no such object", "text/plain")
            return
        data = path.read_bytes()
        match = _RANGE.match(self.headers.get("Range", ""))
        start = int(match.group(1)) if match else 0
        with self.server.count_lock:
            self.server.object_gets[oid] += 1
            self.server.ranges.append(start)
        self.send_response(206 if start else 200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(data) - start))
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        sent, chunk, epoch = start, 32 * 1024, self.server.epoch
        while sent < len(data):
            stall_after = self.server.stall_after
            if epoch != self.server.epoch or (stall_after is not None and sent >= stall_after):
                self.server.stalled.set()
                self.server.stop.wait(600)  # hold the connection open and send nothing
                return
            piece = data[sent:sent + chunk]
            try:
                self.wfile.write(piece)
                self.wfile.flush()
            except OSError:  # the client went away (killed, or gave up)
                return
            sent += len(piece)
            if self.server.rate and len(data) > chunk:
                time.sleep(len(piece) / self.server.rate)


class _FaultServer(_Server):
    def __init__(self, root: Path, user: str, token: str) -> None:
        ThreadingHTTPServer.__init__(self, ("127.0.0.1", 0), _SlowHandler)
        self.root, self.user, self.token = root, user, token
        self.seen = []
        self.rate: Optional[float] = None  # bytes per second for LFS objects bigger than one chunk
        self.stall_after: Optional[int] = None
        self.stalled = threading.Event()
        self.stop = threading.Event()
        self.epoch = 0  # transfers begun before cut_off() stall for good
        self.count_lock = threading.Lock()
        self.batches = 0
        self.object_gets: Dict[str, int] = collections.Counter()
        self.ranges: List[int] = []


class FaultHost(GitHTTPServer):
    """``with FaultHost(root, user, token, rate=1e6) as host``: a token-protected host with slow LFS objects."""

    def __init__(self, root: Path, user: str, token: str, rate: Optional[float] = None,
                 stall_after: Optional[int] = None) -> None:
        self.server = _FaultServer(Path(root), user, token)
        self.server.rate, self.server.stall_after = rate, stall_after
        self.thread = threading.Thread(target=self.server.serve_forever, name="fault-http", daemon=True)

    def configure(self, rate: Optional[float] = None, stall_after: Optional[int] = None) -> None:
        self.server.rate, self.server.stall_after = rate, stall_after
        self.server.stalled.clear()

    def cut_off(self) -> None:
        """Every transfer in flight now stalls for good (a killed app's orphaned git-lfs gets no more bytes)."""
        self.server.epoch += 1

    def reset_counts(self) -> None:
        with self.server.count_lock:
            self.server.batches = 0
            self.server.object_gets.clear()
            self.server.ranges.clear()

    @property
    def batches(self) -> int:
        return self.server.batches

    @property
    def object_gets(self) -> Dict[str, int]:
        return dict(self.server.object_gets)

    @property
    def ranges(self) -> List[int]:
        return list(self.server.ranges)

    def __exit__(self, *exc: object) -> None:
        self.server.stop.set()
        super().__exit__(*exc)


BLOB = "blob.dat"  # not a weight format: the download keeps it (it drops .bin pickles beside safetensors)


def publish_with_blob(tiny_model: Path, folder: Path, name: str = "big.git", blob_bytes: int = 6_000_000) -> Path:
    """The tiny model plus ``blob.dat`` (random bytes in LFS, big enough to kill a pull halfway); the bare repo."""
    model = folder / "model-with-blob"
    shutil.copytree(tiny_model, model)
    (model / BLOB).write_bytes(os.urandom(blob_bytes))
    bare = folder / name
    tinymodel.publish(model, bare, tinymodel.LFS_PATTERNS + ("*.dat",))
    return bare


def lfs_oid(bare: Path, filename: str) -> str:
    """The sha256 the bare repo's pointer for filename names."""
    pointer = tinymodel.git("show", f"main:{filename}", cwd=bare)
    return re.search(r"oid sha256:([0-9a-f]{64})", pointer).group(1)


def tree_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def processes_in(folder: Path) -> List[str]:
    """Command lines of the live processes whose working directory is inside folder."""
    found = []
    folder = str(folder.resolve())
    for process in psutil.process_iter(["pid", "cwd", "cmdline"]):
        cwd = process.info.get("cwd") or ""
        if cwd == folder or cwd.startswith(folder + os.sep):
            found.append(" ".join(process.info.get("cmdline") or []))
    return found


def wait_for(predicate, timeout: float, interval: float = 0.1, what: str = "condition") -> float:
    """Poll until predicate() is true; return the seconds it took."""
    began = time.monotonic()
    while time.monotonic() - began < timeout:
        if predicate():
            return time.monotonic() - began
        time.sleep(interval)
    raise AssertionError(f"{what} not reached within {timeout} s")


_MODELS: Dict[Path, Path] = {}


def quick_model(folder: Path, hidden: int = 64, layers: int = 2, context: int = 0) -> Path:
    """An untrained tiny chat model (seconds to build): these tests need real weights, not good answers.

    A bigger ``hidden`` and a longer ``context`` make a reply that runs for many seconds unless stopped.
    """
    if folder not in _MODELS:
        _MODELS[folder] = tinymodel.build_chat_model(folder, hidden=hidden, layers=layers, steps=0)
        if context:
            config_file = folder / "config.json"
            config = json.loads(config_file.read_text(encoding="utf-8"))
            config["max_position_embeddings"] = context
            config_file.write_text(json.dumps(config, indent=2), encoding="utf-8")
    return _MODELS[folder]
