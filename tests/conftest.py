"""Fixtures shared by every test level: one tiny real model, one local bare LFS remote."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

# Importing the template's modules in-process must not leave __pycache__ for cookiecutter to render.
sys.dont_write_bytecode = True
ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_APP = ROOT / "{{cookiecutter.app_name}}"
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tinymodel  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def clean_template() -> None:
    """Local tool caches inside the template would be rendered into every app; git never has them."""
    for cache in ("__pycache__", ".ruff_cache", ".pytest_cache"):
        for path in TEMPLATE_APP.rglob(cache):
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A trained tiny Llama chat model on disk (weights, tokenizer, chat template)."""
    return tinymodel.build_chat_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def model_remote(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """file:// URL of a bare repo holding the tiny model with weights in LFS."""
    return tinymodel.publish(tiny_model, tmp_path_factory.mktemp("remote") / "tiny-chat.git")


@pytest.fixture()
def remote_copy(model_remote: str, tmp_path: Path) -> Path:
    """A private copy of the remote that a test may move, break or delete."""
    source = Path(model_remote.replace("file://", ""))
    copy = tmp_path / "remote-copy.git"
    shutil.copytree(source, copy)
    return copy


@pytest.fixture(scope="session")
def legacy_python() -> str:
    """The interpreter of the oldest supported stack (gradio 4.44, transformers 4.46), made by scripts/test.sh."""
    python = ROOT / ".venvs" / "legacy" / "bin" / "python"
    if not python.exists():
        pytest.fail(f"{python} is missing: run ./scripts/test.sh, which creates it")
    return str(python)


@pytest.fixture(scope="session")
def app_modules() -> Path:
    """Make the template's (Jinja-free) app modules importable in-process."""
    sys.path.insert(0, str(TEMPLATE_APP))
    return TEMPLATE_APP
