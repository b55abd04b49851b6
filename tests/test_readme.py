"""What a student reads first: defaults in the page's language, and READMEs without seams in either language.

A seam is what a conditional block leaves behind when it renders: a paragraph glued to the next heading, a
run of blank lines, an empty code span, Jinja left over, or (in Chinese) a line break between two characters,
which Markdown renders as a stray space.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import List

import pytest
from apprunner import render
from binaryornot.check import is_binary
from conftest import ROOT

APP = ROOT / "{{cookiecutter.app_name}}"
READMES = sorted(APP.glob("*README.md*"))
CJK = "\u3400-\u9fff\u3000-\u303f\uff00-\uffef"  # ideographs, CJK punctuation, full-width forms
OFFLINE = {"validate_model_repo": False}
SERVER = {"engine": "openai", "engine_url": "http://10.0.0.5:23333/v1", "engine_model": "internlm2-chat",
          "model_repo": ""}
# Every answer that changes a README, each value at least once per language.
COMBINATIONS = [
    {},
    {"platforms": "local", "github_actions": "no", "hardware": "cpu", "loader": "remote-code"},
    {"platforms": "openxlab", "hardware": "a100-40gb", "engine": "lmdeploy", "system_prompt": "Be kind."},
    {"platforms": "huggingface", "hardware": "a10-24gb", "engine": "vllm", "github_actions": "no"},
    {"platforms": "modelscope", "base_model_repo": "https://huggingface.co/internlm/internlm2-chat-1_8b"},
    {"platforms": "openxlab+huggingface", **SERVER},
    {"platforms": "huggingface+modelscope", "hardware": "cpu", "quantize": "none"},
]


def seams(markdown: str, chinese: bool) -> List[str]:
    """Every place where the rendered Markdown reads badly, as 'line N: what'."""
    front = re.match(r"---\n.*?\n---\n", markdown, flags=re.S)  # the Space's front matter is not Markdown
    body = markdown[front.end():] if front else markdown
    shift = markdown[:front.end()].count("\n") if front else 0
    lines = body.split("\n")
    found, fenced = [], False
    for number, line in enumerate(lines):
        before = lines[number - 1] if number else ""
        after = lines[number + 1] if number + 1 < len(lines) else ""
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced or line.startswith("    "):
            continue
        if re.match(r"#{1,6} ", line):
            if number and before.strip():
                found.append(f"line {shift + number + 1}: heading glued to the text above: {line!r}")
            if after.strip():
                found.append(f"line {shift + number + 1}: heading glued to the text below: {line!r}")
        if not line.strip() and not before.strip() and number:
            found.append(f"line {shift + number + 1}: two blank lines in a row")
        if "``" in line.replace("```", ""):
            found.append(f"line {shift + number + 1}: an empty code span: {line!r}")
        if chinese and re.search(f"[{CJK}]$", line) and re.match(f"[{CJK}]", after):
            found.append(f"line {shift + number + 1}: a line break between two Chinese characters renders as a space")
    found += [f"Jinja left: {marker}" for marker in ("{{", "{%", "{#", "cookiecutter.") if marker in body]
    return found


def test_the_seam_finder_sees_each_kind_of_seam():
    assert seams("# T\n\nText.\n\n## A\n\nMore.\n", chinese=False) == []
    assert seams("Text.\n## A\n\nMore.", chinese=False) == ["line 2: heading glued to the text above: '## A'"]
    assert seams("## A\nText.", chinese=False) == ["line 1: heading glued to the text below: '## A'"]
    assert seams("A.\n\n\nB.", chinese=False) == ["line 3: two blank lines in a row"]
    assert seams("| `` / `main` |", chinese=False) == ["line 1: an empty code span: '| `` / `main` |'"]
    assert seams("这是\n中文", chinese=True) == ["line 1: a line break between two Chinese characters renders as"
                                                " a space"]
    assert seams("{{ x }}", chinese=False) == ["Jinja left: {{"]
    assert seams("    ## not a heading\n```\n## nor this\n```", chinese=False) == []


@pytest.mark.parametrize("answers", COMBINATIONS, ids=lambda a: "-".join(f"{v}" for v in a.values()) or "defaults")
@pytest.mark.parametrize("language", ["zh", "en"])
def test_readme_has_no_seams(tmp_path: Path, language: str, answers: dict):
    folder = render(tmp_path, ui_language=language, **answers, **OFFLINE)
    assert seams((folder / "README.md").read_text(encoding="utf-8"), chinese=language == "zh") == []


@pytest.mark.parametrize("template", READMES, ids=lambda p: p.name)
def test_readme_templates_are_rendered_not_copied_as_binary(template: Path):
    """cookiecutter copies a file unrendered when binaryornot calls its first 512 bytes binary."""
    assert not is_binary(str(template))
    assert max(template.read_bytes()[:512]) < 128  # no character can be cut in two there


@pytest.mark.parametrize(("language", "title", "description", "prompt"), [
    ("zh", "InternLM2 对话", "基于微调 InternLM2 模型的对话演示。", "请你介绍一下你自己"),
    ("en", "InternLM2 Chat", "A chat demo of a fine-tuned InternLM2 model.", "Introduce yourself"),
])
def test_defaults_follow_the_language(tmp_path: Path, language: str, title: str, description: str, prompt: str):
    folder = render(tmp_path, ui_language=language, platforms="local", **OFFLINE)
    settings = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    assert (settings["app_title"], settings["description"]) == (title, description)
    assert settings["example_prompts"][0] == prompt
    assert (folder / "README.md").read_text(encoding="utf-8").startswith(f"# {title}\n\n{description}\n")


def test_a_typed_answer_wins_over_the_language_default(tmp_path: Path):
    folder = render(tmp_path, ui_language="zh", app_title="My Bot", description="Mine.", example_prompts="Hi|Bye",
                    **OFFLINE)
    settings = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    assert (settings["app_title"], settings["description"], settings["example_prompts"]) == ("My Bot", "Mine.",
                                                                                          ["Hi", "Bye"])


def test_the_language_is_asked_first_and_says_what_follows_it():
    config = json.loads((ROOT / "cookiecutter.json").read_text(encoding="utf-8"))
    assert next(iter(config)) == "ui_language"
    for key in ("app_title", "description", "example_prompts"):
        assert "cookiecutter.ui_language" in config[key]
    assert "title, description and example prompts follow it" in config["__prompts__"]["ui_language"]["__prompt__"]


@pytest.mark.parametrize(("language", "promises"), [
    ("en", ["clones the model", "downloads the model", "the model at ``"]),
    ("zh", ["把模型克隆到", "首次启动时会下载模型", "重新下载模型", "这是模型 ``"]),
])
def test_engine_openai_readme_names_the_server_and_promises_no_download(tmp_path: Path, language: str,
                                                                        promises: List[str]):
    folder = render(tmp_path, ui_language=language, **SERVER, **OFFLINE)
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert f"`{SERVER['engine_model']}`" in text and f"`{SERVER['engine_url']}`" in text
    assert [promise for promise in promises if promise in text] == []
