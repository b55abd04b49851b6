"""The engine process: ``python -m xlab_chat.engines.worker``, started by the page process.

The model generates here, apart from the web server, so the two never share one
interpreter lock: every HTTP update the server handles would otherwise pause the
generate loop. torch is imported at once, while the page process downloads the
model and imports gradio; the model itself loads when the page sends ``load``.

Messages are JSON lines: commands on stdin, events on the real stdout (fd 1 is
pointed at stderr, so a print from a library cannot break the stream). When the
page process dies, however it dies, its end of the pipe closes: stdin ends and this
process exits at once, even mid-load, so no orphan keeps holding the GPU. This
works the same on Linux, macOS and Windows (no signals, no ``prctl``).
"""

from __future__ import annotations

import os
import queue
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Dict, Optional

from . import protocol
from .images import ImageError


class Worker:
    def __init__(self, events: object) -> None:
        self.events = events
        self.send_lock = threading.Lock()
        self.engine: Optional[object] = None
        self.generations: Dict[int, object] = {}
        self.generations_lock = threading.Lock()

    def send(self, message: dict) -> None:
        with self.send_lock:
            protocol.write_message(self.events, message)

    def load(self, command: dict) -> None:
        try:
            from .transformers_engine import Engine

            engine = Engine.load(Path(command["folder"]), command["hardware"], command["dtype"], command["loader"],
                                 int(command["workers"]), command["quantize"],
                                 Path(command["adapter"]) if command.get("adapter") else None,
                                 Path(command["llava"]) if command.get("llava") else None,
                                 Path(command["visual_encoder"]) if command.get("visual_encoder") else None)
        except Exception as error:  # what went wrong reaches the page; the trace stays in the log
            if not isinstance(error, (ValueError, OSError)):
                traceback.print_exc()
            self.send({"kind": protocol.LOAD_FAILED, "error": f"{error}", "type": type(error).__name__})
            return
        self.engine = engine
        self.send({"kind": protocol.READY, "label": engine.placement.label})

    def chat(self, command: dict) -> None:
        from .transformers_engine import Generation

        command = protocol.decoded_images(command)
        request_id = command["id"]
        engine = self.engine
        if engine is None:  # a chat that raced a restart: the page tells the user to send it again
            self.send({"kind": protocol.ERROR, "id": request_id, "type": "EngineNotReady",
                       "error": "the model is not loaded yet"})
            return
        try:
            ids, dropped = engine.fit_prompt(command["system"], command["history"], command["message"],
                                             int(command["max_new_tokens"]), command["images"])
        except protocol.InputTooLong as error:
            self.send({"kind": protocol.TOO_LONG, "id": request_id, "tokens": error.tokens, "limit": error.limit})
            return
        except ImageError as error:  # an image the model cannot take: the page says why
            self.send({"kind": protocol.ERROR, "id": request_id, "type": "ImageError", "error": error.reason})
            return
        images = [data for m in command["history"] for data in m.get("images") or ()] + command["images"]
        if dropped:
            self.send({"kind": protocol.DROPPED, "id": request_id, "turns": dropped})

        def emit(item: object) -> None:
            if item is Generation.DONE or isinstance(item, Exception):
                with self.generations_lock:  # after the start below has stored it: no stale entry stays
                    self.generations.pop(request_id, None)
            if item is Generation.DONE:
                self.send({"kind": protocol.DONE, "id": request_id})
            elif isinstance(item, ImageError):
                self.send({"kind": protocol.ERROR, "id": request_id, "type": "ImageError", "error": item.reason})
            elif isinstance(item, Exception):
                self.send({"kind": protocol.ERROR, "id": request_id, "type": type(item).__name__,
                           "error": str(item)[:500]})
            else:
                self.send({"kind": protocol.TEXT, "id": request_id, "text": item})

        with self.generations_lock:
            self.generations[request_id] = engine.start(ids, emit, int(command["max_new_tokens"]),
                                                        float(command["temperature"]), float(command["top_p"]),
                                                        float(command["repetition_penalty"]), dropped, images)

    def cancel(self, command: dict) -> None:
        generation = self.generations.get(command["id"])
        if generation is not None:
            generation.cancel()

    def read_commands(self, commands: object, loads: "queue.Queue[dict]") -> None:
        """On its own thread, so the end of stdin is seen even while the model loads or generates."""
        handlers = {protocol.CHAT: self.chat, protocol.CANCEL: self.cancel}
        while True:
            command = protocol.read_message(commands)
            if command is None:  # the page process is gone: leave now
                os._exit(0)
            if command["kind"] == protocol.LOAD:
                loads.put(command)
                continue
            try:
                handlers[command["kind"]](command)
            except Exception as error:  # one bad chat must not stop this reader: Stop and EOF depend on it
                traceback.print_exc()
                if command["kind"] == protocol.CHAT:
                    self.send({"kind": protocol.ERROR, "id": command["id"], "type": type(error).__name__,
                               "error": str(error)[:500]})


def main() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's Ctrl+C is the page's to handle; EOF ends us
    events = os.fdopen(os.dup(1), "wb")  # the protocol's own copy of stdout
    os.dup2(2, 1)  # anything else printed goes to the log
    sys.stdout = sys.stderr
    worker = Worker(events)
    loads: queue.Queue = queue.Queue()
    threading.Thread(target=worker.read_commands, args=(sys.stdin.buffer, loads), name="commands",
                     daemon=True).start()
    try:
        import torch  # noqa: F401 - start the slow import now, while the page downloads the model
    except Exception as error:  # a missing or broken torch: say so, instead of dying unexplained
        traceback.print_exc()
        worker.send({"kind": protocol.LOAD_FAILED, "type": type(error).__name__,
                     "error": f"torch cannot be imported ({type(error).__name__}: {error}) — install the app's"
                              " requirements: pip install -r requirements.txt"})
        threading.Event().wait()
    worker.load(loads.get())
    threading.Event().wait()  # serve until stdin ends (read_commands exits the process)


if __name__ == "__main__":
    main()
