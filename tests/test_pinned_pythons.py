"""The pins install on the oldest and the newest supported Python, and the page chats there end to end.

A fresh venv of Python 3.8 (gradio 4.44, transformers 4.46) and of 3.13 gets the rendered app's
requirements.txt from the package registry, exactly as a platform would install it, and must end up with
every pinned version. torch is left out: the only CPU torch in reach here is the 3.11 wheel (PyPI's
Linux torch pulls gigabytes of CUDA wheels), so the transformers engine runs its end-to-end tests on 3.11,
with the 3.11 pins (.venv) and with Python 3.8's pins (.venvs/legacy, see scripts/test.sh). The page
process never imports torch, so here it runs on each Python in front of a real OpenAI-compatible server
(`transformers serve` on the trained tiny model), which is what engine=openai/lmdeploy/vllm apps do.

The venvs are kept in .venvs/pins-3.X and re-synced on every run (pip's cache makes that quick).
"""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tinymodel
from apprunner import AppProcess, render
from test_engines import chat, chat_model, served  # noqa: F401 - module fixtures: the real server

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from pins_for_python import pinned_for  # noqa: E402

pytestmark = pytest.mark.e2e
OLDEST, NEWEST = "3.8", "3.13"


def interpreter(version: str) -> str:
    """That Python from PATH, or from pyenv's versions (its shims only answer for the global versions)."""
    found = shutil.which(f"python{version}")
    candidates = ([found] if found else []) + sorted(
        glob.glob(os.path.expanduser(f"~/.pyenv/versions/{version}.*/bin/python{version}")), reverse=True)
    for candidate in candidates:
        if subprocess.run([candidate, "-c", "import venv"], capture_output=True, check=False).returncode == 0:
            return candidate
    pytest.fail(f"Python {version} is missing: install it (e.g. `pyenv install {version}`); the pins are proven on"
                f" the oldest and the newest supported Python", pytrace=False)


def run(args: list, timeout: float) -> subprocess.CompletedProcess:
    env = {key: value for key, value in os.environ.items() if key not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-5000:]}")
    return done


@pytest.fixture(scope="module")
def app_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The default app (transformers engine, native loader): its requirements are the fullest set."""
    return render(tmp_path_factory.mktemp("pinned-app"), validate_model_repo=False, ui_language="en")


@pytest.fixture(scope="module", params=[OLDEST, NEWEST])
def pinned_venv(request: pytest.FixtureRequest, app_folder: Path, tmp_path_factory: pytest.TempPathFactory):
    """(python, venv interpreter, pins) with the rendered requirements.txt installed, torch's lines left out."""
    version = request.param
    text = (app_folder / "requirements.txt").read_text(encoding="utf-8")
    without_torch = tmp_path_factory.mktemp(f"pins-{version}") / "requirements.txt"
    without_torch.write_text("\n".join(line for line in text.splitlines() if not line.startswith("torch")) + "\n",
                             encoding="utf-8")
    venv = ROOT / ".venvs" / f"pins-{version}"
    python = venv / "bin" / "python"
    if not python.exists():
        run([interpreter(version), "-m", "venv", "--clear", str(venv)], 300)
    # --no-deps: the pins must be the whole set (pip check below proves nothing is missing), and accelerate's
    # torch requirement would otherwise pull PyPI's torch with gigabytes of CUDA wheels.
    run([str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps", "-r",
         str(without_torch)], 900)
    return version, str(python), pinned_for(text, version)


@pytest.mark.timeout(1500)
def test_every_pin_installs_and_the_page_chats(pinned_venv, served, chat_model, tmp_path: Path,  # noqa: F811
                                               app_folder: Path) -> None:
    version, python, pins = pinned_venv
    listed = json.loads(run([python, "-m", "pip", "list", "--format=json", "--disable-pip-version-check"], 120).stdout)
    installed = {item["name"].lower().replace("_", "-"): item["version"] for item in listed}
    assert run([python, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"], 60).stdout.strip() == version
    wrong = {name: (pin, installed.get(name)) for name, pin in pins.items() if installed.get(name) != pin}
    assert not wrong, f"Python {version}: pinned vs installed {wrong}"
    # pip's own consistency check: every dependency met, but torch (which the platform brings) for accelerate.
    check = subprocess.run([python, "-m", "pip", "check", "--disable-pip-version-check"], capture_output=True,
                           text=True, check=False)
    problems = [line for line in check.stdout.splitlines() if line.strip() and "torch" not in line]
    assert not problems, check.stdout

    app = AppProcess(app_folder, {"ENGINE": "openai", "ENGINE_URL": f"http://127.0.0.1:{served}/v1",
                                  "ENGINE_MODEL": str(chat_model)}, tmp_path / "app.log", python=python)
    try:
        app.wait_stage(("ready",), timeout=240)
        assert chat(app.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY
        assert "Traceback" not in app.log, app.log
    finally:
        app.stop()
