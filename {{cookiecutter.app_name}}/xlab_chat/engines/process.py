"""The page's handle on the engine process: start it, load the model, stream chats, survive its death.

Standard library only: the page process never imports torch. The child
(``engines/worker.py``) starts at once, so its torch import overlaps the
download and gradio's import; it loads the model when told where it is.

If the child dies (kill -9, the OOM killer, a CUDA error) the replies it was
writing end with a clear message, and a new child loads the same verified
folder: no network, no download. A child that dies while loading, or a second
crash within a minute, is not restarted: the page shows the failure instead.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from . import protocol

Emit = Callable[[object], None]
RESTART_WINDOW = 60.0  # seconds: a second crash sooner than this is a crash loop
APP_FOLDER = Path(__file__).resolve().parents[2]
SECRETS = ("MODEL_REPO_TOKEN", "ENGINE_API_KEY")  # never handed to a child process


def describe_exit(code: Optional[int]) -> str:
    if code is None:
        return "it stopped answering"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the system's out-of-memory killer sends this one)" if -code == 9 else ""
        return f"it was killed by {name}{hint}"
    return f"it exited with code {code}"


def no_restart(crashes: List[float], was_ready: bool, what: str, why: str, ready_since: float = 0.0) -> str:
    """Why an engine that just died must not be restarted (its failure message), or "" to restart it.

    Records this crash in ``crashes``. Dying while loading would only repeat; so would dying again within a minute
    of being reloaded after an earlier crash (counted from when it was ready, so a slow load is no excuse).
    """
    now = time.monotonic()
    again = bool(crashes) and now - max(crashes[-1], ready_since) < RESTART_WINDOW
    crashes.append(now)
    if not was_ready:
        return (f"{what} ended while loading the model ({why}) — this is most often too little memory: use a"
                " smaller model, a GPU (HARDWARE), or a machine with more memory; the log above has details")
    if again:
        return (f"{what} ended twice within {RESTART_WINDOW:.0f} s of being ready ({why}), so it is not restarted"
                " again — check the log for the cause (often memory: lower MAX_NEW_TOKENS or CONCURRENCY_LIMIT),"
                " then restart the app")
    return ""


@dataclass(frozen=True)
class LoadSpec:
    folder: str
    hardware: str
    dtype: str
    loader: str
    workers: int
    quantize: str
    adapter: str = ""  # a LoRA adapter folder merged into the model at load time
    llava: str = ""  # an XTuner LLaVA folder (projector, adapters) whose LLM is the model above
    visual_encoder: str = ""  # the CLIP folder a LLaVA model sees with


class Request:
    """One reply being written in the child; ``cancel()`` stops it there at the next token."""

    def __init__(self, owner: "EngineProcess", request_id: int, emit: Emit) -> None:
        self.owner, self.id, self.emit = owner, request_id, emit
        self.cancelled = False

    def cancel(self) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.owner.send({"kind": protocol.CANCEL, "id": self.id})


class StatusSink:
    """What the engine tells the start-up status (startup.ModelStatus implements it)."""

    def progress(self, stage: str, done: int, total: int) -> None: ...
    def engine_ready(self, engine: "EngineProcess") -> None: ...
    def engine_restarting(self, reason: str) -> None: ...
    def engine_failed(self, message: str) -> None: ...


class EngineProcess:
    def __init__(self, status: StatusSink) -> None:
        self.status = status
        self.lock = threading.Lock()
        self.send_lock = threading.Lock()
        self.requests: Dict[int, Request] = {}
        self.ids = itertools.count(1)
        self.label = ""
        self.spec: Optional[LoadSpec] = None
        self.ready = False
        self.crashes: List[float] = []
        self.ready_since = 0.0
        self.closed = False
        self.child = self._spawn()

    # ------------------------------------------------------------ the child

    def _spawn(self) -> "subprocess.Popen[bytes]":
        env = {key: value for key, value in os.environ.items() if key not in SECRETS}  # it runs model code
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_FOLDER), env.get("PYTHONPATH")]))
        child = subprocess.Popen([sys.executable, "-m", "xlab_chat.engines.worker"], stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, env=env)
        threading.Thread(target=self._read_events, args=(child,), name="engine-events", daemon=True).start()
        return child

    def load(self, spec: LoadSpec) -> None:
        """Tell the child where the verified model is; ready or failed arrives through the status."""
        self.spec = spec
        self.send({"kind": protocol.LOAD, **spec.__dict__})

    def send(self, message: dict) -> None:
        with self.send_lock, contextlib.suppress(OSError, ValueError):  # a dead child: its reader reports it
            protocol.write_message(self.child.stdin, message)

    def close(self) -> None:
        """End the child: it exits when its stdin closes."""
        self.closed = True
        with self.send_lock, contextlib.suppress(OSError):
            self.child.stdin.close()

    # ------------------------------------------------------------ chats

    @property
    def active(self) -> int:
        """Replies the child is writing right now."""
        with self.lock:
            return len(self.requests)

    def chat(self, system: str, history: List[protocol.Message], message: str, max_new_tokens: int,
             temperature: float, top_p: float, repetition_penalty: float, emit: Emit,
             images: Sequence[bytes] = ()) -> Request:
        """Start a reply: ``emit`` gets Dropped, text pieces, then FINISHED or an exception."""
        request = Request(self, next(self.ids), emit)
        with self.lock:
            ready = self.ready
            if ready:
                self.requests[request.id] = request
        if not ready:  # the engine died a moment ago and is reloading
            emit(protocol.EngineStopped("the model process is restarting"))
            return request
        self.send(protocol.chat_request(request.id, system, history, message, max_new_tokens, temperature, top_p,
                                        repetition_penalty, images))
        return request

    def _pass_on(self, request_id: int, item: object) -> None:
        with self.lock:
            request = self.requests.get(request_id)
        if request is not None and not request.cancelled:
            request.emit(item)

    def _finish(self, request_id: int, item: object) -> None:
        with self.lock:
            request = self.requests.pop(request_id, None)
        if request is not None and not request.cancelled:
            request.emit(item)

    def _read_events(self, child: "subprocess.Popen[bytes]") -> None:
        while True:
            try:
                event = protocol.read_message(child.stdout)
            except ValueError:  # a torn line: the child died mid-write
                event = None
            if event is None:
                break
            kind = event["kind"]
            if kind == protocol.READY:
                self.label, self.ready = event["label"], True
                self.ready_since = time.monotonic()
                self.status.engine_ready(self)
            elif kind == protocol.LOAD_FAILED:
                self.close()  # an idle child would only hold memory
                self.status.engine_failed(event["error"])
            elif kind == protocol.TEXT:
                self._pass_on(event["id"], event["text"])
            elif kind == protocol.DROPPED:
                self._pass_on(event["id"], protocol.Dropped(int(event["turns"])))
            elif kind == protocol.DONE:
                self._finish(event["id"], protocol.FINISHED)
            elif kind == protocol.TOO_LONG:
                self._finish(event["id"], protocol.InputTooLong(int(event["tokens"]), int(event["limit"])))
            elif kind == protocol.ERROR:
                self._finish(event["id"], protocol.GenerationFailed(event["type"], event["error"]))
        self._child_ended(child)

    def _child_ended(self, child: "subprocess.Popen[bytes]") -> None:
        try:
            code = child.wait(10)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait()
        if self.closed:
            return
        why = describe_exit(code)
        with self.lock:  # together: no chat can slip in between (chat() checks ready under this lock)
            was_ready, self.ready = self.ready, False
            orphans, self.requests = list(self.requests.values()), {}
        for request in orphans:
            if not request.cancelled:
                request.emit(protocol.EngineStopped(f"the model process stopped while writing this reply: {why}"))
        print(f"[engine] the model process ended: {why}", flush=True)
        if self.spec is None:  # it died before it was asked to load anything
            self.status.engine_failed(f"the model process could not start ({why}) — see the log above; usually"
                                      " torch is missing or broken: pip install -r requirements.txt")
            return
        refusal = no_restart(self.crashes, was_ready, "the model process", why, self.ready_since)
        if refusal:
            self.status.engine_failed(refusal)
            return
        self.status.engine_restarting(why)
        self.child = self._spawn()
        self.load(self.spec)
