"""A reader of gradio's queue that reacts the moment a message arrives, as the page's JavaScript does.

gradio_client reads the event stream in one thread and checks what it received every 50 ms
(``stream_sse_v1plus`` sleeps 0.05 s whenever nothing is pending), so each of its first updates
arrives up to 50 ms late. That is the client library's delay, not the server's; this reader measures
the server. Standard library only, plus gradio_client's ``apply_diff`` to rebuild streamed values.
"""

from __future__ import annotations

import http.client
import json
import secrets
import time
import urllib.parse
import urllib.request
from typing import Iterator, List, Tuple


class QueueReader:
    """One endpoint of one running app: join its queue, then read the event stream line by line."""

    def __init__(self, url: str, api_name: str) -> None:
        self.url = url.rstrip("/")
        with urllib.request.urlopen(self.url + "/config", timeout=10) as response:
            config = json.load(response)
        self.prefix = config.get("api_prefix", "/gradio_api")
        states = {c["id"] for c in config["components"] if c.get("type") == "state"}
        wanted = api_name.lstrip("/")
        for dependency in config["dependencies"]:
            if dependency.get("api_name") == wanted:
                break
        else:
            raise KeyError(f"no endpoint named {api_name}")
        self.fn_index = dependency["id"]
        self.is_state = [component in states for component in dependency["inputs"]]

    def _payload(self, args: tuple, session: str) -> bytes:
        values = iter(args)
        data = [None if state else next(values, None) for state in self.is_state]
        return json.dumps({"data": data, "fn_index": self.fn_index, "session_hash": session,
                           "event_data": None, "trigger_id": None}).encode()

    def stream(self, *args: object) -> Iterator[Tuple[float, object]]:
        """Yield (perf_counter when it arrived, the first output's value) per update; the last is the result."""
        from gradio_client.utils import apply_diff

        session = secrets.token_hex(6)
        parts = urllib.parse.urlsplit(self.url)
        join = urllib.request.Request(self.url + self.prefix + "/queue/join", data=self._payload(args, session),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(join, timeout=10) as response:
            json.load(response)
        connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=300)
        try:
            connection.request("GET", f"{parts.path}{self.prefix}/queue/data?session_hash={session}",
                               headers={"Accept": "text/event-stream"})
            response = connection.getresponse()
            value: object = None
            seen = False  # the first update carries the whole value, the later ones diffs against it
            for raw in response:
                if not raw.startswith(b"data:"):
                    continue
                message = json.loads(raw[5:])
                kind = message.get("msg")
                if kind == "process_generating":
                    output = message["output"]
                    if "error" in output and output.get("error"):
                        raise RuntimeError(output["error"])
                    first = output["data"][0]
                    value = apply_diff(value, first) if seen else first
                    seen = True
                    yield time.perf_counter(), value
                elif kind == "process_completed":
                    output = message.get("output", {})
                    if not message.get("success", True):
                        raise RuntimeError(output.get("error") or "the event failed")
                    data = output.get("data") or []
                    if data and not seen:
                        value = data[0]
                    yield time.perf_counter(), value
                    return
                elif kind == "close_stream":
                    return
        finally:
            connection.close()

    def call(self, *args: object) -> dict:
        """One request: when the first non-empty update and the last one came, relative to the send."""
        started = time.perf_counter()
        first = None
        arrivals: List[float] = []
        value: object = None
        for arrived, value in self.stream(*args):
            arrivals.append(arrived)
            if first is None and value:
                first = arrived
        ended = arrivals[-1] if arrivals else time.perf_counter()
        return {"first": (first or ended) - started, "elapsed": ended - started, "text": value,
                "updates": len(arrivals)}
