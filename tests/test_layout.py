"""The generated repo a student owns: one app.py on top, a README in their language, CI that runs, and
template updates with cruft that keep their edits.

The cruft round trip runs on real git repos: the template is committed to a local repo, an app is made
from commit A, the student edits app.py, the template gains a runtime change B, and ``cruft update``
brings B in.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import tinymodel
import yaml
from apprunner import render
from conftest import ROOT
from test_bake import template_markers

CRUFT = str(Path(sys.executable).with_name("cruft"))
OFFLINE = {"validate_model_repo": False}


def headings(text: str) -> list:
    return [line for line in text.splitlines() if line.startswith("## ")]


def commands(text: str) -> list:
    """Indented command lines and fenced code: what must be the same in every language."""
    fenced = re.findall(r"```.*?```", text, flags=re.S)
    indented = [line for line in text.splitlines() if line.startswith("    ") and not line.strip().startswith("#")]
    strip_comments = [re.sub(r"#.*", "", block) for block in fenced]
    return strip_comments + [re.sub(r"#.*", "", line).rstrip() for line in indented]


def front_matter(text: str) -> str:
    return text.split("---", 2)[1] if text.startswith("---") else ""


def test_readme_is_written_in_the_chosen_language(tmp_path: Path):
    zh = (render(tmp_path / "zh", ui_language="zh", **OFFLINE) / "README.md").read_text(encoding="utf-8")
    en = (render(tmp_path / "en", ui_language="en", **OFFLINE) / "README.md").read_text(encoding="utf-8")
    for text in (zh, en):
        assert not template_markers(text)
    assert len(headings(zh)) == len(headings(en)) >= 8
    assert all(re.search(r"[\u4e00-\u9fff]", heading) for heading in headings(zh))
    assert not any(re.search(r"[\u4e00-\u9fff]", heading) for heading in headings(en))
    untitled = [re.sub(r"^title: .*$", "", front_matter(text), flags=re.M) for text in (zh, en)]  # titles follow
    assert untitled[0] == untitled[1] and "sdk: gradio" in untitled[0]  # the language; the rest is the same
    assert commands(zh) == commands(en)


@pytest.mark.parametrize("platforms", ["local", "modelscope", "all"])
def test_both_readmes_have_the_same_sections_for_each_platform_choice(tmp_path: Path, platforms: str):
    zh = render(tmp_path / "zh", ui_language="zh", platforms=platforms, **OFFLINE) / "README.md"
    en = render(tmp_path / "en", ui_language="en", platforms=platforms, **OFFLINE) / "README.md"
    assert len(headings(zh.read_text(encoding="utf-8"))) == len(headings(en.read_text(encoding="utf-8")))


def workflow(folder: Path) -> dict:
    return yaml.safe_load((folder / ".github" / "workflows" / "check.yml").read_text(encoding="utf-8"))


def test_github_actions_answer_adds_or_leaves_out_the_workflow(tmp_path: Path):
    assert not (render(tmp_path / "no", github_actions="no", **OFFLINE) / ".github").exists()
    folder = render(tmp_path / "yes", github_actions="yes", **OFFLINE)
    jobs = workflow(folder)["jobs"]
    assert set(jobs) == {"model-repo", "boot"}
    steps = {step.get("name", ""): step for job in jobs.values() for step in job["steps"]}
    check = next(step for name, step in steps.items() if name.startswith("Check the model repo"))
    assert check["env"]["MODEL_REPO_TOKEN"] == "${{ secrets.MODEL_REPO_TOKEN }}"  # a secret, never a literal
    install = next(step for name, step in steps.items() if name.startswith("Install"))
    lines = install["run"].split("\n")
    assert "whl/cpu" in lines[0] and "requirements.txt" in lines[1]  # CPU torch first: requirements keep it
    # Weekly too: a platform rebuild that would break the pinned app is heard of before users meet it.
    triggers = workflow(folder)[True]  # YAML 1.1 reads the key `on` as true
    assert {"push", "schedule"} <= set(triggers)
    (cron,) = [entry["cron"] for entry in triggers["schedule"]]
    minute, hour, day, month, weekday = cron.split()
    assert day == month == "*" and weekday.isdigit() and minute.isdigit() and hour.isdigit()


def test_workflow_steps_run_here(tmp_path: Path, tiny_model: Path):
    """The check and the boot test, exactly as the workflow runs them, in the rendered app."""
    url = tinymodel.publish(tiny_model, tmp_path / "tiny.git")
    folder = render(tmp_path / "out", github_actions="yes", model_repo=url, hardware="cpu", **OFFLINE)
    steps = [step for job in workflow(folder)["jobs"].values() for step in job["steps"] if "run" in step
             and not step.get("name", "").startswith("Install")]
    assert [step["run"] for step in steps] == ["python -m xlab_chat check", "python -m xlab_chat boot-test"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for step in steps:
        done = subprocess.run(["bash", "-c", step["run"]], cwd=folder, env=env, capture_output=True, text=True,
                              timeout=300)
        print(done.stdout[-2000:])
        assert done.returncode == 0, done.stdout + done.stderr
    assert "the model repo passed every check" in subprocess.run(
        ["bash", "-c", steps[0]["run"]], cwd=folder, env=env, capture_output=True, text=True, timeout=300).stdout
    assert not (folder / "model").exists()  # the boot test downloads nothing


def test_boot_test_fails_clearly_when_the_app_cannot_start(tmp_path: Path):
    folder = render(tmp_path / "out", **OFFLINE)
    (folder / "settings.json").write_text("{ not json", encoding="utf-8")  # a broken edit
    done = subprocess.run([sys.executable, "-m", "xlab_chat", "boot-test"], cwd=folder, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.startswith("ERROR: settings.json is not valid JSON")


# ---------------------------------------------------------------- template updates with cruft


def git(*args: str, cwd: Path) -> str:
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.invalid", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.invalid"}
    return subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True, text=True).stdout


def template_repo(target: Path) -> Path:
    """This template, committed to a git repo of its own (cruft needs one to record the commit)."""
    ignore = shutil.ignore_patterns("__pycache__", ".ruff_cache", ".pytest_cache")
    target.mkdir()
    for name in ("cookiecutter.json", "hooks", "templates", "{{cookiecutter.app_name}}"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, target / name, ignore=ignore)
        else:
            shutil.copy2(source, target / name)
    git("init", "-q", "-b", "main", cwd=target)
    git("add", "-A", cwd=target)
    git("commit", "-q", "-m", "A", cwd=target)
    return target


def cruft(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([CRUFT, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cruft_round_trip_replaces_the_runtime_and_keeps_the_students_edits(tmp_path: Path):
    template = template_repo(tmp_path / "template")
    commit_a = git("rev-parse", "HEAD", cwd=template).strip()
    made = cruft("create", str(template), "--no-input", "--output-dir", str(tmp_path / "out"), "--extra-context",
                 json.dumps({**OFFLINE, "app_title": "Demo"}), cwd=tmp_path)
    assert made.returncode == 0, made.stdout + made.stderr
    app = tmp_path / "out" / "internlm2-chat-demo"
    assert json.loads((app / ".cruft.json").read_text())["commit"] == commit_a
    git("init", "-q", "-b", "main", cwd=app)
    git("add", "-A", cwd=app)
    git("commit", "-q", "-m", "made", cwd=app)

    # The student changes the page title in app.py.
    app_py = app / "app.py"
    edited = app_py.read_text(encoding="utf-8").replace("TITLE = settings.app_title", 'TITLE = "我的学习助手"')
    assert edited != app_py.read_text(encoding="utf-8")
    app_py.write_text(edited, encoding="utf-8")
    git("commit", "-q", "-am", "my title", cwd=app)

    # The template fixes its runtime.
    texts = template / "{{cookiecutter.app_name}}" / "xlab_chat" / "page" / "texts.py"
    texts.write_text(texts.read_text(encoding="utf-8") + "\nTEMPLATE_FIX = 'B'\n", encoding="utf-8")
    git("commit", "-q", "-am", "B", cwd=template)
    commit_b = git("rev-parse", "HEAD", cwd=template).strip()

    assert cruft("check", cwd=app).returncode == 1  # out of date before the update
    updated = cruft("update", "-y", cwd=app)
    assert updated.returncode == 0, updated.stdout + updated.stderr
    assert "TEMPLATE_FIX = 'B'" in (app / "xlab_chat" / "page" / "texts.py").read_text(encoding="utf-8")
    assert 'TITLE = "我的学习助手"' in app_py.read_text(encoding="utf-8")
    assert json.loads((app / ".cruft.json").read_text())["commit"] == commit_b
    assert cruft("check", cwd=app).returncode == 0
    assert "<<<<<<<" not in app_py.read_text(encoding="utf-8")
