"""What the page and an engine say to each other: messages in, text pieces out, with cancel.

Standard library only, so the page process never imports torch. Between the page
and the engine process each message is one line of JSON on a pipe.
"""

from __future__ import annotations

import base64
import json
from typing import IO, Dict, List, Optional, Sequence

# {"role", "content": str}, and for a user turn that brought images "images": [bytes, ...] (base64 on the pipe)
Message = Dict[str, object]

# child -> parent, one JSON object per line: {"kind": ..., ...}
READY, LOAD_FAILED, TEXT, DROPPED, DONE, ERROR, TOO_LONG = "ready", "load-failed", "text", "dropped", "done", "error", \
    "too-long"
# parent -> child
LOAD, CHAT, CANCEL = "load", "chat", "cancel"


class InputTooLong(ValueError):
    """The user's message alone does not fit the model's context."""

    def __init__(self, tokens: int, limit: int) -> None:
        super().__init__(f"The message is too long: {tokens} tokens, and this model reads at most {limit}.")
        self.tokens = tokens
        self.limit = limit


class EngineStopped(RuntimeError):
    """The engine process ended while it was writing this reply (killed, out of memory, a CUDA error)."""


class GenerationFailed(RuntimeError):
    """generate() raised in the engine; ``kind`` is the exception's class name there (e.g. OutOfMemoryError)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class Dropped:
    """The oldest turns were left out so the prompt fits: sent before the first piece of text."""

    def __init__(self, turns: int) -> None:
        self.turns = turns


class _Done:
    def __repr__(self) -> str:
        return "DONE"


FINISHED = _Done()  # the reply is complete


def write_message(stream: IO[bytes], message: dict) -> None:
    stream.write(json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\n")
    stream.flush()


def read_message(stream: IO[bytes]) -> Optional[dict]:
    """The next message, or None at the end of the stream (the other side is gone)."""
    line = stream.readline()
    if not line:
        return None
    return json.loads(line)


def chat_request(request_id: int, system: str, history: List[Message], message: str, max_new_tokens: int,
                 temperature: float, top_p: float, repetition_penalty: float, images: Sequence[bytes] = ()) -> dict:
    """Images travel as base64 inside the request: bytes in memory, never a path another user could fetch."""
    return {"kind": CHAT, "id": request_id, "system": system, "history": [_encoded(m) for m in history],
            "message": message, "images": [_b64(data) for data in images], "max_new_tokens": max_new_tokens,
            "temperature": temperature, "top_p": top_p, "repetition_penalty": repetition_penalty}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _encoded(message: Message) -> Message:
    if not message.get("images"):
        return message
    return {**message, "images": [_b64(data) for data in message["images"]]}  # type: ignore[union-attr]


def decoded_images(request: dict) -> dict:
    """The request with every image back as bytes (the inverse of chat_request's encoding)."""
    history = [{**m, "images": [base64.b64decode(d) for d in m["images"]]} if m.get("images") else m
               for m in request["history"]]
    return {**request, "history": history, "images": [base64.b64decode(d) for d in request.get("images", [])]}
