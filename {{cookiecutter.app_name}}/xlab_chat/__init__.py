"""The runtime behind app.py: settings, the model download and check, the engine and the chat page.

`cruft update` replaces this package as a whole when the template improves, so
change the page in app.py and the settings in settings.json, not in here.
Importing the package loads the standard library only: the template's hooks use it.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .settings import BOOT_TEST_ENV, Settings, SettingsError
from .settings import load_settings as _read_settings

if TYPE_CHECKING:
    from .page.ui import PageLook

__all__ = ["Settings", "launch", "load_settings"]

# Before gradio is ever imported: no analytics calls (they time out behind firewalls), and loopback
# never goes through a proxy (gradio's own localhost check fails behind one otherwise).
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ["no_proxy"] = os.environ["NO_PROXY"] = ",".join(
    filter(None, [os.environ.get("no_proxy") or os.environ.get("NO_PROXY"), "localhost,127.0.0.1"])
)


def load_settings() -> Settings:
    """settings.json, each value overridable by its environment variable; a bad value ends the app with one line."""
    try:
        return _read_settings()
    except SettingsError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        raise SystemExit(2) from None


def launch(settings: Optional[Settings] = None, *, title: Optional[str] = None, description: Optional[str] = None,
           examples: Optional[Sequence[str]] = None, theme: Optional[str] = None,
           extra: Optional[Callable[[object], None]] = None) -> None:
    """Start the model first (download, check, load), then import gradio and serve the page meanwhile."""
    from .startup import ModelStatus, start_in_background

    settings = settings or load_settings()
    boot_test = os.environ.get(BOOT_TEST_ENV) == "1"
    status = ModelStatus() if boot_test else start_in_background(settings)
    from .page.ui import PageLook, serve  # gradio's import overlaps with the model's start

    look: PageLook = PageLook(
        title=settings.app_title if title is None else title,
        description=settings.description if description is None else description,
        examples=tuple(settings.example_prompts if examples is None else examples),
        theme=theme,
        extra=extra,
    )
    serve(settings, status, look, boot_test=boot_test)
