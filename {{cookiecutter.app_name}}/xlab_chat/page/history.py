"""Turn whatever history the installed gradio sends into plain role/content messages.

gradio 4 sends ``[(user, bot)]`` pairs, 4.38-5.x ``{"role", "content": str}``
dicts and 6.x content as a list of ``{"type": "text", "text": ...}`` blocks.
Anything of another shape (an API client can send anything) is skipped, not trusted.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional

ROLES = ("user", "assistant")


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, list):
        return "".join(_text(part) for part in content)
    return ""  # a tuple is a file, (path,) or (path, alt text), in gradio 4


def _files(content: object) -> List[str]:
    """Paths of the files in one message: (path,) tuples in gradio 4, {"type": "file", "file": {"path"}} in 6."""
    if isinstance(content, tuple) and content and isinstance(content[0], str):
        return [content[0]]
    if isinstance(content, dict):
        data = content.get("file") if content.get("type") == "file" else content
        path = data.get("path") if isinstance(data, dict) else None
        return [path] if isinstance(path, str) else []
    if isinstance(content, list):
        return [path for part in content for path in _files(part)]
    return []


def clean_text(text: str) -> str:
    """Drop lone surrogates and control characters that break tokenizers, keep newlines and tabs."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return "".join(ch for ch in text if ch in "\n\t" or ch.isprintable() or ord(ch) > 0x9F)


def normalise_history(history: object, uploads: Optional[Mapping[str, bytes]] = None) -> List[Dict[str, object]]:
    """Role/content messages; a user turn's images (bytes) join it under "images", but only images this page
    received itself (``uploads``, by path): a path a client writes into the history is never read."""
    messages: List[Dict[str, object]] = []
    uploads = uploads or {}
    for item in history if isinstance(history, (list, tuple)) else []:
        if isinstance(item, dict) and item.get("role") in ROLES:
            parts = [(item["role"], item.get("content"))]
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            parts = list(zip(ROLES, item))
        else:
            continue
        for role, content in parts:
            text = clean_text(_text(content))
            images = [uploads[path] for path in _files(content) if path in uploads] if role == "user" else []
            if not text and not images:
                continue
            if messages and messages[-1]["role"] == role:
                last = messages[-1]  # gradio 6 splits one reply into several bubbles, gradio 4 a file from its text
                last["content"] = "\n".join(filter(None, [str(last["content"]), text]))
            else:
                messages.append({"role": role, "content": text})
                last = messages[-1]
            if images:
                last["images"] = [*last.get("images", []), *images]  # type: ignore[list-item]
    while messages and messages[0]["role"] != "user":
        messages.pop(0)
    return messages
