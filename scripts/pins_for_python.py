#!/usr/bin/env python3
"""The exact pins one Python gets from a stack's pin file: ``pins_for_python.py STACK PYTHON`` prints them flat.

scripts/test.sh installs the oldest supported Python's set (3.8: gradio 4.44, transformers 4.46) into a
venv of the interpreter it has, so the oldest stack's own versions run the end-to-end tests too.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Dict, Iterator

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

PIN_FILES = Path(__file__).resolve().parents[1] / "templates" / "pins"


def marker_environment(python: str) -> Dict[str, str]:
    """What pip sees for that Python on Linux x86_64, the platforms' machine."""
    return {"python_version": python, "python_full_version": f"{python}.0", "sys_platform": "linux",
            "platform_machine": "x86_64", "platform_system": "Linux", "os_name": "posix",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}


def active_lines(text: str, python: str) -> Iterator[Requirement]:
    """The requirement lines of a requirements file whose markers hold on that Python."""
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is None or requirement.marker.evaluate(marker_environment(python)):
            yield requirement


def pinned_for(text: str, python: str) -> Dict[str, str]:
    """Canonical name -> exact version of the lines whose markers hold on that Python; torch's bounds skipped."""
    found: Dict[str, str] = {}
    for requirement in active_lines(text, python):
        specifiers = list(requirement.specifier)
        if len(specifiers) == 1 and specifiers[0].operator == "==":
            found[canonicalize_name(requirement.name)] = specifiers[0].version
    return found


def main(argv: list) -> int:
    if len(argv) != 2:
        print("usage: pins_for_python.py STACK PYTHON, e.g. remote-code 3.8", file=sys.stderr)
        return 2
    path = PIN_FILES / f"{argv[0]}.txt"
    if not path.is_file():
        print(f"ERROR: {path} is missing — run scripts/refresh_pins.py", file=sys.stderr)
        return 2
    for name, version in sorted(pinned_for(path.read_text(encoding="utf-8"), argv[1]).items()):
        print(f"{name}=={version}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
