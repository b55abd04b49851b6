"""Every answer renders a complete, lint-clean app with no Jinja left in it."""

from __future__ import annotations

import json
import py_compile
import re
import subprocess
import sys
from pathlib import Path

import pytest

# The default render (platforms=all); tests/test_platforms.py checks which files each other choice leaves out.
RUNTIME = {
    "xlab_chat/__init__.py", "xlab_chat/__main__.py", "xlab_chat/settings.py", "xlab_chat/startup.py",
    "xlab_chat/model/__init__.py", "xlab_chat/model/check.py", "xlab_chat/model/download.py",
    "xlab_chat/model/git_tools.py", "xlab_chat/model/lfs_objects.py", "xlab_chat/model/platform_tiers.py",
    "xlab_chat/model/repo_url.py", "xlab_chat/model/source.py",
    "xlab_chat/engines/__init__.py", "xlab_chat/engines/internlm2.py", "xlab_chat/engines/transformers_engine.py",
    "xlab_chat/engines/process.py", "xlab_chat/engines/protocol.py", "xlab_chat/engines/worker.py",
    "xlab_chat/engines/int8.py", "xlab_chat/engines/guard.py", "xlab_chat/engines/openai_api.py",
    "xlab_chat/engines/server.py", "xlab_chat/engines/lora.py", "xlab_chat/model/adapter.py",
    "xlab_chat/model/adapter_check.py", "xlab_chat/model/answers.py", "xlab_chat/model/endpoint.py",
    "xlab_chat/model/engine_check.py", "xlab_chat/model/files_check.py", "xlab_chat/model/fit_check.py",
    "xlab_chat/model/lfs_check.py", "xlab_chat/model/listing.py", "xlab_chat/model/report.py",
    "xlab_chat/engines/safetensors_file.py", "xlab_chat/engines/hf_compat.py", "xlab_chat/engines/kernels.py",
    "xlab_chat/engines/llava.py", "xlab_chat/engines/images.py", "xlab_chat/model/llava_layout.py",
    "xlab_chat/model/llava_check.py", "xlab_chat/model/loader_files.py", "xlab_chat/page/uploads.py",
    "xlab_chat/engines/llamacpp.py", "xlab_chat/engines/gguf_convert.py",
    "xlab_chat/model/gguf_cache.py", "xlab_chat/model/llamacpp_check.py",
    "xlab_chat/page/__init__.py", "xlab_chat/page/history.py", "xlab_chat/page/texts.py", "xlab_chat/page/ui.py",
    "xlab_chat/page/line.py", "xlab_chat/page/stream.py",
}
EXPECTED_FILES = {
    ".gitignore", "README.md", "app.py", "settings.json", "ms_deploy.json", "packages.txt", "requirements.txt",
    ".github/workflows/check.yml",
} | RUNTIME
APP_RUFF = Path(__file__).resolve().parent / "app_ruff.toml"
HARDWARE = ["auto", "a10-24gb", "a100-40gb", "cpu"]


def template_markers(text: str) -> bool:
    """Jinja left in a rendered file (GitHub Actions' own ${{ secrets.X }} expressions are not Jinja)."""
    text = re.sub(r"\$\{\{ (secrets|github)\.\w+ \}\}", "", text)
    return "{{" in text or "{%" in text or "cookiecutter." in text


def rendered_files(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()}


@pytest.mark.parametrize("hardware", HARDWARE)
def test_every_hardware_choice_renders_the_exact_file_set(cookies, hardware: str) -> None:
    result = cookies.bake(extra_context={"hardware": hardware})
    assert result.exit_code == 0, result.exception
    folder = Path(result.project_path)
    assert rendered_files(folder) == EXPECTED_FILES
    defaults = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    assert defaults["hardware"] == hardware  # extra_context typos are ignored silently: check the value landed


def test_defaults_render_an_openxlab_app(cookies) -> None:
    result = cookies.bake()
    assert result.exit_code == 0, result.exception
    folder = Path(result.project_path)
    assert folder.name == "internlm2-chat-demo"
    defaults = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    assert defaults["model_repo"] == "https://code.openxlab.org.cn/OpenLMLab/internlm2-chat-7b.git"
    assert (defaults["temperature"], defaults["top_p"], defaults["max_new_tokens"]) == (0.8, 0.8, 1024)
    assert defaults["repetition_penalty"] == 1.005
    assert (folder / "packages.txt").read_text().split() == ["git", "git-lfs"]
    assert "/model/" in (folder / ".gitignore").read_text().splitlines()


def test_answers_with_quotes_and_markup_survive_as_data(cookies) -> None:
    tricky = 'He said "hi" \\ {x} \n <b>bold</b> 上海 \'; import os'
    result = cookies.bake(extra_context={"system_prompt": tricky, "app_title": 'My "demo"'})
    assert result.exit_code == 0, result.exception
    defaults = json.loads((Path(result.project_path) / "settings.json").read_text(encoding="utf-8"))
    assert defaults["system_prompt"] == tricky
    assert defaults["app_title"] == 'My "demo"'


@pytest.mark.parametrize("hardware", HARDWARE)
def test_no_jinja_left_and_code_is_lint_clean(cookies, hardware: str) -> None:
    result = cookies.bake(extra_context={"hardware": hardware, "system_prompt": "You are kind."})
    assert result.exit_code == 0, result.exception
    folder = Path(result.project_path)
    for path in folder.rglob("*"):
        if path.is_file():
            assert not template_markers(path.read_text(encoding="utf-8")), path
    for path in folder.rglob("*.py"):
        py_compile.compile(str(path), doraise=True)
    lint = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--config", str(APP_RUFF), "."],
                          cwd=folder, capture_output=True, text=True)
    assert lint.returncode == 0, lint.stdout + lint.stderr


def test_top_level_shows_what_a_student_owns(cookies) -> None:
    """One Python file on top (app.py); the runtime is one package the student never needs to open."""
    folder = Path(cookies.bake().project_path)
    top_python = sorted(p.name for p in folder.iterdir() if p.suffix == ".py")
    assert top_python == ["app.py"]
    assert sorted(p.name for p in folder.iterdir() if p.is_dir()) == [".github", "xlab_chat"]
    app = (folder / "app.py").read_text(encoding="utf-8")
    for point in ("TITLE =", "DESCRIPTION =", "EXAMPLES =", "THEME =", "def extra_components(gr)", "xlab_chat.launch("):
        assert point in app
    assert len(app.splitlines()) <= 30
