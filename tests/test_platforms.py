"""The `platforms` answer renders exactly the chosen platforms' files, with values that each platform accepts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml  # PyYAML comes with gradio and transformers
from packaging.requirements import Requirement
from test_bake import EXPECTED_FILES, HARDWARE, rendered_files, template_markers

ROOT = Path(__file__).resolve().parents[1]
CHOICES = ["all", "openxlab", "huggingface", "modelscope", "openxlab+huggingface", "openxlab+modelscope",
           "huggingface+modelscope", "local"]
PLATFORM_FILES = {"modelscope": {"ms_deploy.json"}}  # OpenXLab and Hugging Face live in README.md
SECTIONS = {"openxlab": "## Deploy on OpenXLab", "huggingface": "## Deploy as a Hugging Face Space",
            "modelscope": "## Deploy on ModelScope"}
SECTIONS_ZH = {"openxlab": "## 部署到 OpenXLab", "huggingface": "## 部署到 Hugging Face Space",
               "modelscope": "## 部署到魔搭 ModelScope"}
# Hugging Face's hardware flavors (huggingface.co/docs/hub/spaces-gpus): A10G small/large have 15/46 GB RAM,
# A100 large has 40 GB of GPU memory, CPU upgrade has 8 vCPU and 32 GB.
HF_HARDWARE = {"auto": "a10g-small", "a10-24gb": "a10g-large", "a100-40gb": "a100-large", "cpu": "cpu-upgrade"}
# ModelScope's quick-deploy resources: the free CPU one, or the 48 GB xGPU (16 GB is too small for a 7B in bf16).
MS_RESOURCE = {"auto": "xgpu/8v-cpu-64g-mem-48g", "a10-24gb": "xgpu/8v-cpu-64g-mem-48g",
               "a100-40gb": "xgpu/8v-cpu-64g-mem-48g", "cpu": "platform/2v-cpu-16g-mem"}
HF_COLORS = {"red", "yellow", "green", "blue", "indigo", "purple", "pink", "gray"}


def chosen(choice: str) -> set:
    return set(SECTIONS) if choice == "all" else set(choice.split("+")) & set(SECTIONS)


def bake(cookies, **answers: object) -> Path:
    result = cookies.bake(extra_context={"validate_model_repo": False, "ui_language": "en", **answers})
    assert result.exit_code == 0, result.exception
    folder = Path(result.project_path)
    defaults = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    for key in ("hardware", "loader"):  # extra_context typos are ignored silently: check the values landed
        if key in answers:
            assert defaults[key] == answers[key]
    return folder


def front_matter(folder: Path) -> dict:
    text = (folder / "README.md").read_text(encoding="utf-8")
    assert text.startswith("---\n"), "the Space's front matter must be the very first thing in README.md"
    block, rest = text[4:].split("\n---\n", 1)
    assert rest.startswith("\n# "), "the README's title follows the front matter"
    data = yaml.safe_load(block)
    assert isinstance(data, dict)
    return data


def gradio_line(folder: Path, python: str) -> Requirement:
    """The gradio line of requirements.txt that holds on that Python."""
    lines = [Requirement(line.split("#")[0]) for line in (folder / "requirements.txt").read_text().splitlines()
             if line.split("#")[0].strip()]
    lines = [line for line in lines if line.name == "gradio"]
    environment = {"python_version": python, "python_full_version": f"{python}.0"}
    active = [line for line in lines if line.marker is None or line.marker.evaluate(environment)]
    assert len(active) == 1, active
    return active[0]


def test_cookiecutter_offers_every_choice_with_a_label() -> None:
    config = json.loads((ROOT / "cookiecutter.json").read_text(encoding="utf-8"))
    assert config["platforms"] == CHOICES  # the first is the default
    labels = config["__prompts__"]["platforms"]
    assert labels["__prompt__"] and set(labels) - {"__prompt__"} == set(CHOICES)


@pytest.mark.parametrize("choice", CHOICES)
def test_each_choice_renders_exactly_its_platform_files(cookies, choice: str) -> None:
    folder = bake(cookies, platforms=choice)
    platforms = chosen(choice)
    expected = {name for name in EXPECTED_FILES if not any(name in files for files in PLATFORM_FILES.values())}
    for platform in platforms:
        expected |= PLATFORM_FILES.get(platform, set())
    assert rendered_files(folder) == expected
    readme = (folder / "README.md").read_text(encoding="utf-8")
    for platform, heading in SECTIONS.items():
        assert (heading in readme) == (platform in platforms), heading
    readme_zh = (bake(cookies, platforms=choice, ui_language="zh") / "README.md").read_text(encoding="utf-8")
    for platform, heading in SECTIONS_ZH.items():
        assert (heading in readme_zh) == (platform in platforms), heading
    assert readme.startswith("---\n") == ("huggingface" in platforms)
    if "huggingface" not in platforms:
        assert readme.startswith("# InternLM2 Chat\n") and "sdk_version" not in readme
    for always in ("## Run it on your computer", "## Check the model repo", "## Settings"):
        assert always in readme
    for path in folder.rglob("*"):
        if path.is_file():
            assert not template_markers(path.read_text(encoding="utf-8")), path


@pytest.mark.parametrize("loader", ["native", "remote-code"])
@pytest.mark.parametrize("hardware", HARDWARE)
def test_space_front_matter(cookies, hardware: str, loader: str) -> None:
    title = 'My "demo": 上海 #1'
    folder = bake(cookies, platforms="huggingface", hardware=hardware, loader=loader, app_title=title)
    space = front_matter(folder)
    assert space["title"] == title
    assert space["sdk"] == "gradio" and space["app_file"] == "app.py"
    assert space["python_version"] == "3.11"  # a string: an unquoted 3.10 would read as 3.1
    assert space["suggested_hardware"] == HF_HARDWARE[hardware]
    assert space["colorFrom"] in HF_COLORS and space["colorTo"] in HF_COLORS and space["emoji"]
    assert space["license"] == "apache-2.0"
    assert isinstance(space["sdk_version"], str)
    # The Space installs gradio==sdk_version beside requirements.txt: it must be the gradio pinned for the Space's
    # Python (on remote-code one that allows huggingface_hub<1.0; tests/test_requirements.py resolves both for real).
    assert str(gradio_line(folder, space["python_version"]).specifier) == f"=={space['sdk_version']}"


@pytest.mark.parametrize("hardware", HARDWARE)
def test_modelscope_deploy_file(cookies, hardware: str) -> None:
    folder = bake(cookies, platforms="modelscope", hardware=hardware, system_prompt='Say "hi"', temperature=0.3)
    studio = json.loads((folder / "ms_deploy.json").read_text(encoding="utf-8"))
    defaults = json.loads((folder / "settings.json").read_text(encoding="utf-8"))
    assert studio["sdk_type"] == "gradio"
    assert studio["resource_configuration"] == MS_RESOURCE[hardware]
    assert studio["base_image"] == "ubuntu22.04-py311-torch2.9.1-modelscope1.35.0"
    assert str(gradio_line(folder, "3.11").specifier) == f"=={studio['sdk_version']}"  # the pinned gradio
    variables = studio["environment_variables"]
    assert all(set(item) == {"name", "value"} and isinstance(item["value"], str) for item in variables)
    names = [item["name"] for item in variables]
    assert len(names) == len(set(names))
    values = {item["name"]: item["value"] for item in variables}
    assert values == {
        "MODEL_REPO": defaults["model_repo"], "MODEL_REVISION": defaults["model_revision"],
        "HARDWARE": hardware, "LOADER": defaults["loader"], "MAX_NEW_TOKENS": "1024", "TEMPERATURE": "0.3",
        "TOP_P": "0.8", "REPETITION_PENALTY": "1.005", "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "7860",
    }
    assert "MODEL_REPO_TOKEN" not in names, "secrets never go into a committed file"


def test_normalised_model_repo_reaches_ms_deploy(cookies) -> None:
    """The post-gen hook turns a hub web page into its git URL in settings.json, the README and ms_deploy.json."""
    folder = bake(cookies, model_repo="https://huggingface.co/internlm/internlm2-chat-7b/tree/v1.1")
    studio = json.loads((folder / "ms_deploy.json").read_text(encoding="utf-8"))
    values = {item["name"]: item["value"] for item in studio["environment_variables"]}
    assert values["MODEL_REPO"] == "https://huggingface.co/internlm/internlm2-chat-7b"
    assert values["MODEL_REVISION"] == "v1.1"
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert "/tree/" not in readme and front_matter(folder)["sdk"] == "gradio"


@pytest.mark.parametrize("hardware", HARDWARE)
def test_readme_names_the_hardware_for_each_platform(cookies, hardware: str) -> None:
    folder = bake(cookies, hardware=hardware)
    readme = (folder / "README.md").read_text(encoding="utf-8")
    openxlab = readme.split("## Deploy on OpenXLab", 1)[1].split("\n## ", 1)[0]
    expected = {"cpu": "the CPU tier", "a100-40gb": "**A100 40 GB**"}.get(hardware, "**A10 24 GB**")
    assert f"the hardware: {expected}" in openxlab
    assert "MODEL_REPO_TOKEN" in openxlab and "secret" in openxlab
    assert f"`{HF_HARDWARE[hardware]}`" in readme.split("## Deploy as a Hugging Face Space", 1)[1]
    assert f"`{MS_RESOURCE[hardware]}`" in readme.split("## Deploy on ModelScope", 1)[1]
    check = readme.split("## Check the model repo", 1)[1].split("\n## ", 1)[0]
    for needle in ("python -m xlab_chat check", "--hardware", "MODEL_CHECK_TIMEOUT", "`0`", "`1`", "`2`"):
        assert needle in check
