"""The repo check's vocabulary: one Check per line, the Report that holds them, the time bound, units.

Standard library only, like the rest of ``model/``: every ``*_check`` module builds its lines from these.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import List, Mapping, Optional

MAX_TIMEOUT = 60.0  # an unreachable or stalled host ends the whole check within this bound
DEFAULT_TIMEOUT = 45.0  # leaves room under MAX_TIMEOUT for the local steps and the cleanup
TIMEOUT_ENV = "MODEL_CHECK_TIMEOUT"
OK, WARN, FAIL, SKIP, INFO = "ok", "warn", "fail", "skip", "info"
SYMBOLS = {OK: "✓", WARN: "⚠", FAIL: "✗", SKIP: "–", INFO: "·"}
ASCII_SYMBOLS = {OK: "[ok]", WARN: "[warn]", FAIL: "[FAIL]", SKIP: "[-]", INFO: "[i]"}
LATER = "run `python -m xlab_chat check` in the app folder once the host can be reached"
TOKEN_FIX = ("set MODEL_REPO_TOKEN to an access token (and MODEL_REPO_USER: your user name on Hugging Face or"
             " OpenXLab, oauth2 on ModelScope) in the environment, e.g. `export MODEL_REPO_TOKEN=…`, then check again;"
             " on the platform add it as a secret environment variable")


@dataclass
class Check:
    title: str
    status: str
    detail: str
    fix: str = ""

    def line(self, symbols: Mapping[str, str]) -> str:
        text = f"{symbols[self.status]} {self.title}: {self.detail}"
        if self.fix and self.status in (WARN, FAIL):
            text += f" — {self.fix}"
        return text


@dataclass
class Report:
    repo: str
    revision: str
    hardware: str
    checks: List[Check] = field(default_factory=list)
    notes: List[str] = field(default_factory=list)
    unreachable: bool = False  # the host could not be reached: nothing was really checked
    needs_token: bool = False
    heading: str = ""  # replaces the first line (the engine server check has no revision or hardware)
    config: Optional[dict] = None  # the repo's config.json, when it could be read (an adapter's base needs it)
    base_repo: str = ""  # the base model, when the repo holds a LoRA adapter
    base_revision: str = "main"
    visual_repo: str = ""  # an XTuner LLaVA folder's CLIP tower ("" picks the default on the model's hub)
    visual_revision: str = "main"

    @property
    def failed(self) -> List[Check]:
        return [c for c in self.checks if c.status == FAIL]

    @property
    def warnings(self) -> List[Check]:
        return [c for c in self.checks if c.status == WARN]

    @property
    def ok(self) -> bool:
        return not self.failed

    def render(self, symbols: Optional[Mapping[str, str]] = None) -> str:
        symbols = symbols or output_symbols()
        head = self.heading or f"Model repo check: {self.repo} (revision {self.revision}, hardware {self.hardware})"
        return "\n".join([head, *self.notes, *("  " + c.line(symbols) for c in self.checks)])


def output_symbols(stream: object = None) -> Mapping[str, str]:
    """✓ ⚠ ✗ where the console can print them, plain words where it cannot (old Windows code pages)."""
    encoding = getattr(stream or sys.stdout, "encoding", None) or "ascii"
    try:
        "".join(SYMBOLS.values()).encode(encoding)
    except (LookupError, UnicodeEncodeError):
        return ASCII_SYMBOLS
    return SYMBOLS


def check_timeout(env: Optional[Mapping[str, str]] = None) -> float:
    """The overall bound in seconds: MODEL_CHECK_TIMEOUT if set, never more than MAX_TIMEOUT."""
    raw = (os.environ if env is None else env).get(TIMEOUT_ENV, "").strip()
    try:
        value = float(raw) if raw else DEFAULT_TIMEOUT
    except ValueError:
        value = DEFAULT_TIMEOUT
    return min(max(value, 1.0), MAX_TIMEOUT) if value == value else DEFAULT_TIMEOUT


def human_bytes(count: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:,.1f} {unit}"
    return f"{count:.0f} bytes"


def human_params(count: float) -> str:
    return f"{count / 1e9:.2f}B" if count >= 1e8 else f"{count / 1e6:.2f}M"


class Deadline:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.end = time.monotonic() + seconds

    def left(self, cap: float = MAX_TIMEOUT) -> float:
        return max(0.5, min(cap, self.end - time.monotonic()))
