"""Start the demo: ``python app.py``.

Every setting is in settings.py and can be changed with an environment variable.
The model starts loading before gradio is imported, so the two overlap.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Behind a proxy gradio's own localhost check fails unless loopback bypasses it.
os.environ["no_proxy"] = os.environ["NO_PROXY"] = ",".join(
    filter(None, [os.environ.get("no_proxy") or os.environ.get("NO_PROXY"), "localhost,127.0.0.1"])
)

from settings import SettingsError, load_settings  # noqa: E402
from startup import start_in_background  # noqa: E402


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(2)
    status = start_in_background(settings)  # imports torch and loads the model on its own thread
    from chat_ui import serve  # gradio's import overlaps with that

    serve(settings, status)


if __name__ == "__main__":
    main()
