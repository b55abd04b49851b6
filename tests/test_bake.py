"""Every answer renders a complete, lint-clean app with no Jinja left in it."""

from __future__ import annotations

import json
import py_compile
import subprocess
import sys
from pathlib import Path

import pytest

# The default render (platforms=all); tests/test_platforms.py checks which files each other choice leaves out.
EXPECTED_FILES = {
    ".gitignore", "README.md", "app.py", "chat_history.py", "chat_ui.py", "defaults.json", "engine.py",
    "git_tools.py",
    "internlm2.py", "model_repo.py", "ms_deploy.json", "packages.txt", "repo_check.py", "repo_url.py",
    "requirements.txt", "ruff.toml", "settings.py", "startup.py", "ui_text.py",
}
HARDWARE = ["auto", "a10-24gb", "a100-40gb", "cpu"]


def rendered_files(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("hardware", HARDWARE)
def test_every_hardware_choice_renders_the_exact_file_set(cookies, hardware: str) -> None:
    result = cookies.bake(extra_context={"hardware": hardware})
    assert result.exit_code == 0, result.exception
    folder = Path(result.project_path)
    assert rendered_files(folder) == EXPECTED_FILES
    defaults = json.loads((folder / "defaults.json").read_text(encoding="utf-8"))
    assert defaults["hardware"] == hardware  # extra_context typos are ignored silently: check the value landed


def test_defaults_render_an_openxlab_app(cookies) -> None:
    result = cookies.bake()
    assert result.exit_code == 0, result.exception
    folder = Path(result.project_path)
    assert folder.name == "internlm2-chat-demo"
    defaults = json.loads((folder / "defaults.json").read_text(encoding="utf-8"))
    assert defaults["model_repo"] == "https://code.openxlab.org.cn/OpenLMLab/internlm2-chat-7b.git"
    assert (defaults["temperature"], defaults["top_p"], defaults["max_new_tokens"]) == (0.8, 0.8, 1024)
    assert defaults["repetition_penalty"] == 1.005
    assert (folder / "packages.txt").read_text().split() == ["git", "git-lfs"]
    assert "/model/" in (folder / ".gitignore").read_text().splitlines()


def test_answers_with_quotes_and_markup_survive_as_data(cookies) -> None:
    tricky = 'He said "hi" \\ {x} \n <b>bold</b> 上海 \'; import os'
    result = cookies.bake(extra_context={"system_prompt": tricky, "app_title": 'My "demo"'})
    assert result.exit_code == 0, result.exception
    defaults = json.loads((Path(result.project_path) / "defaults.json").read_text(encoding="utf-8"))
    assert defaults["system_prompt"] == tricky
    assert defaults["app_title"] == 'My "demo"'


@pytest.mark.parametrize("hardware", HARDWARE)
def test_no_jinja_left_and_code_is_lint_clean(cookies, hardware: str) -> None:
    result = cookies.bake(extra_context={"hardware": hardware, "system_prompt": "You are kind."})
    assert result.exit_code == 0, result.exception
    folder = Path(result.project_path)
    for path in folder.rglob("*"):
        if path.is_file():
            text = path.read_text(encoding="utf-8")
            assert "{{" not in text and "{%" not in text and "cookiecutter." not in text, path
    for path in folder.glob("*.py"):
        py_compile.compile(str(path), doraise=True)
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "."], cwd=folder,
                          capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr
