"""Turn whatever history the installed gradio sends into plain role/content messages.

gradio 4 sends ``[(user, bot)]`` pairs, 4.38-5.x ``{"role", "content": str}``
dicts and 6.x content as a list of ``{"type": "text", "text": ...}`` blocks.
Anything of another shape (an API client can send anything) is skipped, not trusted.
"""

from __future__ import annotations

from typing import Dict, List

ROLES = ("user", "assistant")


def _text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, dict):
        return str(content.get("text", "")) if content.get("type", "text") == "text" else ""
    if isinstance(content, (list, tuple)):
        return "".join(_text(part) for part in content)
    return ""


def clean_text(text: str) -> str:
    """Drop lone surrogates and control characters that break tokenizers, keep newlines and tabs."""
    text = text.encode("utf-8", "replace").decode("utf-8")
    return "".join(ch for ch in text if ch in "\n\t" or ch.isprintable() or ord(ch) > 0x9F)


def normalise_history(history: object) -> List[Dict[str, str]]:
    messages: List[Dict[str, str]] = []
    for item in history if isinstance(history, (list, tuple)) else []:
        if isinstance(item, dict) and item.get("role") in ROLES:
            pairs = [(item["role"], _text(item.get("content")))]
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            pairs = list(zip(ROLES, (_text(part) for part in item)))
        else:
            continue
        for role, text in pairs:
            text = clean_text(text)
            if not text:
                continue
            if messages and messages[-1]["role"] == role:
                messages[-1]["content"] += "\n" + text  # gradio 6 splits one reply into several bubbles
            else:
                messages.append({"role": role, "content": text})
    while messages and messages[0]["role"] != "user":
        messages.pop(0)
    return messages
