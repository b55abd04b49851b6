"""The template's own code (hooks, tests, benchmarks) is ruff clean, like the app it renders."""

import subprocess
import sys

from conftest import ROOT


def test_template_code_is_ruff_clean():
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=ROOT,
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
