"""``python -m xlab_chat check``: the model repo check, without downloading the weights.
``python -m xlab_chat boot-test``: start app.py's page, prove it serves, and exit, without any model.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path

from .model.check import cli
from .settings import APP_FOLDER, BOOT_TEST_ENV

USAGE = "use `python -m xlab_chat check [--hardware …]` or `python -m xlab_chat boot-test`"


def main(argv: list) -> int:
    if argv[:1] == ["boot-test"]:
        os.environ[BOOT_TEST_ENV] = "1"
        app = Path(APP_FOLDER, "app.py")
        if not app.is_file():
            print(f"ERROR: {app} is missing — run the boot test in the app's folder", file=sys.stderr)
            return 2
        try:
            runpy.run_path(str(app), run_name="__main__")
        except SystemExit as done:
            return int(done.code or 0) if not isinstance(done.code, str) else 1
        return 0
    if argv[:1] in ([], ["check"]) or argv[0].startswith("-"):
        return cli(argv)
    print(f"ERROR: unknown command {argv[0]!r} — {USAGE}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
