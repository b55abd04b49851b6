"""Ask an OpenAI-compatible server what it serves: the address, the key, /v1/models.

Standard library only (``http.client``): the repo check (in ``model/``, which the hooks run) probes the
server with it, and ``engines/openai_api.py`` streams replies over the same Endpoint. The API key is sent
only in the Authorization header and never appears in a message.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
from dataclasses import dataclass, field
from typing import Dict, List, Tuple
from urllib.parse import urlsplit

CONTEXT_SIGNS = ("context length", "maximum context", "context_length", "too long", "max_model_len",
                 "exceeds the model", "prompt is too long", "input length")


class EndpointError(RuntimeError):
    """The server could not be used; the message says why and what to do."""

    def __init__(self, what: str, fix: str, status: int = 0) -> None:
        super().__init__(f"{what} — {fix}")
        self.what, self.fix, self.status = what, fix, status


@dataclass(frozen=True)
class Endpoint:
    base: str  # ends with /v1
    model: str
    api_key: str = field(default="", repr=False)
    timeout: float = 60.0  # seconds to the first byte, and between bytes

    @classmethod
    def from_url(cls, url: str, model: str, api_key: str = "", timeout: float = 60.0) -> "Endpoint":
        url = url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise EndpointError(f"ENGINE_URL {url!r} is not an http(s) address",
                                "set ENGINE_URL to the server's address, e.g. http://10.0.0.5:23333/v1")
        for suffix in ("/chat/completions", "/models"):
            if url.endswith(suffix):
                url = url[: -len(suffix)]
        if not url.endswith("/v1"):
            url += "/v1"
        try:
            port = urlsplit(url).port
        except ValueError:
            port = -1
        if port == -1:
            raise EndpointError("ENGINE_URL's port is not a number from 1 to 65535",
                                "set ENGINE_URL to the server's address, e.g. http://10.0.0.5:23333/v1")
        api_key = api_key.strip()
        if api_key and (not api_key.isprintable() or not all(ord(c) < 256 for c in api_key)):
            raise EndpointError("ENGINE_API_KEY holds characters an HTTP header cannot carry",
                                "paste the key again without spaces, line breaks or quotes")
        return cls(url, model, api_key, timeout)

    @property
    def shown(self) -> str:
        """scheme://host:port only: what the page may show of the address (no user info, path or query)."""
        parts = urlsplit(self.base)
        return f"{parts.scheme}://{parts.hostname}" + (f":{parts.port}" if parts.port else "")

    def connection(self, timeout: float) -> http.client.HTTPConnection:
        parts = urlsplit(self.base)
        kind = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return kind(parts.hostname or "", parts.port, timeout=timeout)

    def headers(self) -> Dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def path(self, tail: str) -> str:
        prefix = urlsplit(self.base).path.rstrip("/")
        return f"{prefix}/{tail}"


def error_for_status(status: int, body: str, endpoint: Endpoint) -> EndpointError:
    """The server's refusal as a message a user can act on (the key itself never appears in it)."""
    detail = error_detail(body)
    if status in (401, 403):
        fix = ("set ENGINE_API_KEY to a key the server accepts" if endpoint.api_key
               else "the server needs a key: set ENGINE_API_KEY (as a secret)")
        return EndpointError(f"the server refused the API key (HTTP {status})", fix, status)
    if status == 429:
        return EndpointError(f"the server is busy or over its rate limit (HTTP 429{': ' + detail if detail else ''})",
                             "wait a moment and send the message again", status)
    lower = detail.lower()
    overflow = any(sign in lower for sign in CONTEXT_SIGNS)
    if status == 404 or (status == 400 and not overflow and any(w in lower for w in ("model", "pinned"))):
        return EndpointError(f"the server does not serve the model {endpoint.model!r} ({detail or 'HTTP 404'})",
                             "set ENGINE_MODEL to a name the server's /v1/models lists", status)
    if status >= 500:
        return EndpointError(f"the server failed (HTTP {status}{': ' + detail if detail else ''})",
                             "check the server's log; send the message again", status)
    return EndpointError(f"the server refused the request (HTTP {status}{': ' + detail if detail else ''})",
                         "check ENGINE_MODEL and the server's log", status)


def error_detail(body: str) -> str:
    try:
        data = json.loads(body)
    except ValueError:
        return body.strip()[:300]
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message", "")))
        if isinstance(error, dict):
            error = error.get("message", "")
        return str(error)[:300]
    return str(data)[:300]


def list_models(endpoint: Endpoint, timeout: float = 10.0) -> List[str]:
    """The model names the server lists at /v1/models; EndpointError if it can't be asked."""
    try:
        connection = endpoint.connection(timeout)
        connection.request("GET", endpoint.path("models"), headers=endpoint.headers())
        response = connection.getresponse()
        body = response.read(4 * 1024 * 1024).decode("utf-8", "replace")
    except (OSError, http.client.HTTPException) as error:
        raise EndpointError(f"cannot reach the engine server at {endpoint.base} ({error_reason(error)})",
                            "check ENGINE_URL and that the server is running and reachable from here") from None
    finally:
        with contextlib.suppress(Exception):
            connection.close()
    if response.status != 200:
        raise error_for_status(response.status, body, endpoint)
    try:
        data = json.loads(body).get("data") or []
        return [str(item.get("id")) for item in data if isinstance(item, dict)]
    except (ValueError, AttributeError):
        raise EndpointError("the server's /v1/models answer is not the OpenAI format",
                            "check that ENGINE_URL points at an OpenAI-compatible API (…/v1)") from None


def error_reason(error: BaseException) -> str:
    if isinstance(error, (socket.timeout, TimeoutError)):
        return "no answer in time"
    return getattr(error, "strerror", None) or str(error) or type(error).__name__


def check_endpoint(endpoint: Endpoint, timeout: float = 10.0) -> Tuple[str, List[str]]:
    """("ok" | "unlisted" | "unknown", names): the model among /v1/models; EndpointError when unusable."""
    names = list_models(endpoint, timeout)
    if not names:
        return "unknown", names
    return ("ok" if endpoint.model in names else "unlisted"), names
