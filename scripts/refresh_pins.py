#!/usr/bin/env python3
"""Refresh the exact versions a generated app installs: ``.venv/bin/python scripts/refresh_pins.py``.

A deployed app is rebuilt by its platform on every restart or push; with version ranges it would pick up
whatever was released that day, a combination no test ever ran. So each app's requirements.txt pins every
package, per Python line, to a set the template's tests ran. This script makes that set:

- ``pins/<stack>.in`` holds the ranges each stack accepts (why each bound exists is said there);
- uv resolves them once for every Python from 3.8 on and every platform (``--universal``), taking the newest
  release each Python can install, and the result goes to ``templates/pins/<stack>.txt``, which the template's
  requirements.txt includes;
- torch is left out (the app keeps a lower bound, so a platform's preinstalled CUDA torch is never replaced);
- ``templates/pins/gradio.j2`` records the gradio that each stack pins for Python 3.11, the Python of the
  Space and the ModelScope studio, whose ``sdk_version`` must be that gradio.

Then ``./scripts/test.sh`` proves the new set (its venvs install it) and the change is one reviewed commit;
apps take it with ``cruft update``. ``--report`` only says which pins have newer releases, and changes nothing.
"""

from __future__ import annotations

import argparse
import difflib
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List

from pins_for_python import pinned_for  # beside this script

ROOT = Path(__file__).resolve().parents[1]
INPUTS = ROOT / "pins"
OUTPUTS = ROOT / "templates" / "pins"
STACKS = ("native", "remote-code", "openai", "lmdeploy", "vllm", "llamacpp")
SDIST_ONLY = {"llamacpp": "llama-cpp-python"}  # the registry has no wheel: the platform builds it
OLDEST_PYTHON = "3.8"
PLATFORM_PYTHON = "3.11"  # the Hugging Face Space's python_version and the ModelScope image's Python
INDEX = os.environ.get("PIP_INDEX_URL") or "https://pypi.org/simple"
# torch resolved under a marker no machine has: its own dependencies then fall under that marker too.
NEVER = "sys_platform == 'never'"
HEADER = ("# Pinned by xlab-chat-template (its scripts/refresh_pins.py, from pins/{stack}.in) to what its tests ran."
          "\n# Take newer pins with `cruft update` (see README.md), not by hand.\n")


def uv() -> str:
    found = shutil.which("uv", path=str(Path(sys.executable).parent)) or shutil.which("uv")
    if not found:
        raise SystemExit("ERROR: uv is missing — run ./scripts/test.sh once (it installs the dev requirements)")
    return found


def compile_stack(stack: str, work: Path) -> str:
    """uv's universal resolution of one stack, without torch and what only torch needs."""
    overrides = work / "overrides.txt"
    overrides.write_text(f"torch; {NEVER}\n", encoding="utf-8")
    command = [uv(), "pip", "compile", str(INPUTS / f"{stack}.in"), "--universal", "--python-version",
               OLDEST_PYTHON, "--overrides", str(overrides), "--only-binary", ":all:", "--no-header",
               "--no-annotate", "--index-url", INDEX, "--quiet"]
    if stack in SDIST_ONLY:
        command += ["--no-binary", SDIST_ONLY[stack]]
    env = dict(os.environ, UV_PYTHON_DOWNLOADS="never", UV_NO_CONFIG="1")
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ERROR: the {stack} stack does not resolve — change pins/{stack}.in:\n{done.stderr}")
    lines = [line for line in done.stdout.splitlines() if line.strip() and not line.rstrip().endswith(NEVER)]
    return HEADER.format(stack=stack) + "\n".join(lines) + "\n"


def gradio_template(locks: Dict[str, str]) -> str:
    versions = {stack: pinned_for(text, PLATFORM_PYTHON)["gradio"] for stack, text in locks.items()}
    body = ", ".join(f'"{stack}": "{version}"' for stack, version in versions.items())
    return ("{#- Written by scripts/refresh_pins.py: the gradio each stack pins for Python " + PLATFORM_PYTHON
            + ", which the Space's and the studio's sdk_version must name. -#}\n"
            + "{%- set platform_gradio = {" + body + "} -%}\n")


def write_atomically(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def main(argv: List[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--report", action="store_true",
                        help="only list the pins that newer releases would change; write nothing, exit 0")
    parser.add_argument("stacks", nargs="*", metavar="STACK", help=f"some of: {', '.join(STACKS)} (default: all)")
    args = parser.parse_args(argv)
    unknown = [stack for stack in args.stacks if stack not in STACKS]
    if unknown:
        parser.error(f"unknown stack {unknown[0]!r}; use some of: {', '.join(STACKS)}")
    args.stacks = args.stacks or list(STACKS)
    with tempfile.TemporaryDirectory() as work:
        locks = {stack: compile_stack(stack, Path(work)) for stack in args.stacks}
    files = {OUTPUTS / f"{stack}.txt": text for stack, text in locks.items()}
    if set(args.stacks) == set(STACKS):
        files[OUTPUTS / "gradio.j2"] = gradio_template(locks)
    changed = 0
    for path, text in files.items():
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        if old == text:
            continue
        changed += 1
        if args.report:
            diff = difflib.unified_diff(old.splitlines(), text.splitlines(), str(path.relative_to(ROOT)), "newest",
                                        lineterm="", n=0)
            print("\n".join(line for line in diff if re.match(r"[-+][a-z0-9]", line)))
        else:
            write_atomically(path, text)
            print(f"wrote {path.relative_to(ROOT)}")
    if args.report:
        print(f"{changed} pin file(s) have newer releases" if changed else "every pin is the newest release")
    elif changed:
        print("Now run ./scripts/test.sh: its venvs install the new pins, and the suite proves them.")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
