#!/usr/bin/env bash
# Install everything the tests need, idempotently, then run them: ./scripts/test.sh [pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v git-lfs >/dev/null 2>&1 || missing+=(git-lfs)
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
# A CJK font, so screenshots of the Chinese page are legible.
[ -e /usr/share/fonts/truetype/wqy/wqy-microhei.ttc ] || missing+=(fonts-wqy-microhei)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"
fi

python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
# The CPU wheel first, pinned: nothing later may pull the multi-GB CUDA build.
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -r requirements-dev.txt

# The oldest supported stack: exactly the pins Python 3.8 gets (gradio 4.44, transformers 4.46), on this
# interpreter (the only CPU torch in reach is the 3.11 wheel), for the second end-to-end run. It is made
# afresh whenever those pins change, so no package of an older set lingers.
legacy_pins=$(.venv/bin/python scripts/pins_for_python.py remote-code 3.8)
if [ ! -x .venvs/legacy/bin/python ] || [ "$(cat .venvs/legacy/pins.txt 2>/dev/null)" != "$legacy_pins" ]; then
  rm -rf .venvs/legacy
  "$python" -m venv .venvs/legacy
  .venvs/legacy/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
  printf '%s\n' "$legacy_pins" > .venvs/legacy/pins.wanted
  .venvs/legacy/bin/python -m pip install -q --disable-pip-version-check -r .venvs/legacy/pins.wanted
  mv .venvs/legacy/pins.wanted .venvs/legacy/pins.txt
fi

exec .venv/bin/python -m pytest "$@"
