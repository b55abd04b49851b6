"""Stream chat replies from any OpenAI-compatible server: LMDeploy, vLLM, SGLang, transformers serve, a hosted API.

Standard library only (``http.client``), so the page process stays light and no
client library version can break it. The whole conversation is sent each time,
with the system prompt and the sampling settings. Stop closes the connection,
which aborts the request in those servers. A malformed event is skipped, not
fatal: some servers have sent raw control characters inside their JSON.

The API key is a secret: it is read from ENGINE_API_KEY, sent only in the
Authorization header, and never logged, shown or put on a command line.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import threading
import time
from typing import Callable, List, Optional
from urllib.parse import urlsplit

from ..model.endpoint import (  # the probe the repo check uses too
    CONTEXT_SIGNS,
    Endpoint,
    EndpointError,
    error_detail,
    error_for_status,
    error_reason,
)
from . import protocol

Emit = Callable[[object], None]
MAX_TRIMS = 8


class Request:
    """One streamed reply; ``cancel()`` closes its connection, which aborts it on the server."""

    def __init__(self, emit: Emit) -> None:
        self.emit = emit
        self.cancelled = threading.Event()
        self.sock: Optional[socket.socket] = None  # kept apart: http.client drops its own reference early
        self.lock = threading.Lock()

    def cancel(self) -> None:
        self.cancelled.set()
        with self.lock:
            sock = self.sock
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


class OpenAIEngine:
    """The engine interface (``label``, ``active``, ``chat``) over an OpenAI-compatible server."""

    def __init__(self, endpoint: Endpoint, label: str, extra: Optional[dict] = None,
                 on_lost: Optional[Callable[[], bool]] = None) -> None:
        self.endpoint = endpoint
        self.label = label
        # Server-specific sampling fields: "repetition_penalty" names the field that carries the app's penalty
        # (llama.cpp calls it "repeat_penalty"); any other is sent as it is (e.g. llama.cpp's top_k).
        self.extra = dict(extra or {})
        self.on_lost = on_lost  # True when the server is known to have died (a launched one)
        self._active = 0
        self._lock = threading.Lock()

    @property
    def active(self) -> int:
        return self._active

    def chat(self, system: str, history: List[protocol.Message], message: str, max_new_tokens: int,
             temperature: float, top_p: float, repetition_penalty: float, emit: Emit) -> Request:
        request = Request(emit)
        messages = ([{"role": "system", "content": system}] if system else []) + list(history) + [
            {"role": "user", "content": message}]
        body = {"model": self.endpoint.model, "messages": messages, "stream": True, "max_tokens": max_new_tokens,
                "temperature": temperature, "top_p": top_p if temperature > 0 else 1.0}
        fixed = dict(self.extra)
        penalty_field = fixed.pop("repetition_penalty", "")
        if penalty_field:
            body[penalty_field] = repetition_penalty
        body.update(fixed)
        threading.Thread(target=self._run, args=(request, body), name="engine-stream", daemon=True).start()
        return request

    def _run(self, request: Request, body: dict) -> None:
        with self._lock:
            self._active += 1
        try:
            self._stream_with_trimming(request, body)
        except EndpointError as error:
            request.emit(protocol.GenerationFailed("EndpointError", str(error)) if not request.cancelled.is_set()
                         else protocol.FINISHED)
        except Exception as error:  # a bug must still end the reply; its text may hold a header, so not shown
            print(f"[engine] the reply stream failed: {type(error).__name__}", flush=True)
            request.emit(protocol.GenerationFailed(type(error).__name__, ""))
        finally:
            with self._lock:
                self._active -= 1

    def _stream_with_trimming(self, request: Request, body: dict) -> None:
        """Drop the oldest turns while the server says the prompt is over its context, and say so."""
        dropped = 0
        while True:
            try:
                self._stream(request, body, dropped)
                return
            except EndpointError as error:
                overflow = error.status == 400 and any(s in error.what.lower() for s in CONTEXT_SIGNS)
                messages = body["messages"]
                first_user = next((i for i, m in enumerate(messages) if m["role"] != "system"), len(messages))
                later_user = next((i for i, m in enumerate(messages) if i > first_user and m["role"] == "user"),
                                  None)
                if not overflow or later_user is None or later_user == len(messages) - 1 or dropped >= MAX_TRIMS:
                    if overflow:  # the message alone is over the server's context; it did not say by how much
                        request.emit(protocol.InputTooLong(0, 0))
                        return
                    raise
                body = {**body, "messages": messages[:first_user] + messages[later_user:]}
                dropped += 1

    def _stream(self, request: Request, body: dict, dropped: int) -> None:
        endpoint = self.endpoint
        connection = endpoint.connection(endpoint.timeout)
        try:
            if request.cancelled.is_set():
                request.emit(protocol.FINISHED)
                return
            connection.connect()
            with request.lock:
                request.sock = connection.sock
            if request.cancelled.is_set():  # Stop came while connecting: send nothing
                request.emit(protocol.FINISHED)
                return
            connection.request("POST", endpoint.path("chat/completions"), body=json.dumps(body).encode("utf-8"),
                               headers=endpoint.headers())
            response = connection.getresponse()
            if response.status != 200:
                raise error_for_status(response.status, response.read(65536).decode("utf-8", "replace"), endpoint)
            if dropped:
                request.emit(protocol.Dropped(dropped))
            self._read_events(request, response)
        except (OSError, http.client.HTTPException) as error:
            if request.cancelled.is_set():
                request.emit(protocol.FINISHED)
                return
            if self.on_lost is not None and self.on_lost():
                request.emit(protocol.EngineStopped("the engine server stopped while writing this reply"))
                return
            if isinstance(error, (socket.timeout, TimeoutError)):
                raise EndpointError(f"the engine server sent nothing for {endpoint.timeout:.0f} s",
                                    "the server is overloaded or stuck: try again, or raise ENGINE_TIMEOUT") from None
            raise EndpointError(f"lost the engine server at {endpoint.base} ({error_reason(error)})",
                                "check that the server is running; send the message again") from None
        finally:
            with contextlib.suppress(Exception):
                connection.close()

    def _read_events(self, request: Request, response: http.client.HTTPResponse) -> None:
        """Server-sent events: ``data: {chunk}`` lines, ``data: [DONE]`` or the end of the stream to finish."""
        malformed, complete = 0, False
        for raw in iter(response.readline, b""):
            line = raw.decode("utf-8", "replace").strip()
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                complete = True
                break
            try:
                chunk = json.loads(data, strict=False)  # strict=False: control characters inside strings
                if "error" in chunk:
                    error = chunk["error"]
                    raise EndpointError(f"the server failed mid-reply ({error_detail(json.dumps(chunk)) or error})",
                                        "send the message again")
                choices = chunk.get("choices") or []
                delta = (choices[0].get("delta") or {}) if choices else {}
                text = delta.get("content") or ""
                complete = complete or bool(choices and choices[0].get("finish_reason"))
            except (ValueError, AttributeError, IndexError, TypeError):
                malformed += 1
                if malformed == 1:
                    print("[engine] skipped a malformed event from the engine server", flush=True)
                continue
            if text and not request.cancelled.is_set():
                request.emit(text)
        if not complete and not request.cancelled.is_set():  # neither [DONE] nor a finish_reason: cut off
            raise ConnectionResetError("the reply stream ended before the reply did")
        request.emit(protocol.FINISHED)


def wait_until_serving(endpoint: Endpoint, alive: Callable[[], bool], deadline: float,
                       interval: float = 0.5) -> None:
    """Poll /health (LMDeploy, vLLM, transformers serve) or /v1/models until the server answers."""
    root = urlsplit(endpoint.base)
    while time.monotonic() < deadline:
        if not alive():
            raise EndpointError("the engine server exited while starting", "see the log above for its error")
        try:
            connection = endpoint.connection(5)
            connection.request("GET", root.path.rsplit("/v1", 1)[0] + "/health")
            status = connection.getresponse().status
            if status == 200:
                return
            if status == 404:  # a server without /health: its model list answers once it serves
                connection.close()
                connection = endpoint.connection(5)
                connection.request("GET", endpoint.path("models"), headers=endpoint.headers())
                if connection.getresponse().status == 200:
                    return
        except (OSError, http.client.HTTPException):
            pass
        finally:
            with contextlib.suppress(Exception):
                connection.close()
        time.sleep(interval)
    raise EndpointError("the engine server did not start in time", "raise ENGINE_START_TIMEOUT, or check its log")
