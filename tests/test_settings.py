"""Settings: template answers as defaults, env overrides, and one clear line for a bad value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from apprunner import render

DEFAULTS = {"app_title": "T", "description": "", "model_repo": "https://example.invalid/x.git", "model_revision": "v1",
            "hardware": "cpu", "system_prompt": "Be kind.", "max_new_tokens": 512, "temperature": 0.7, "top_p": 0.9,
            "repetition_penalty": 1.02}


def test_env_overrides_template_answers(app_modules, tmp_path):
    from xlab_chat.settings import load_settings

    settings = load_settings({}, DEFAULTS)
    assert (settings.max_new_tokens, settings.temperature, settings.hardware) == (512, 0.7, "cpu")
    assert settings.server_name == "127.0.0.1" and settings.concurrency_limit == 1
    env = {"MAX_NEW_TOKENS": "64", "TEMPERATURE": "0", "HARDWARE": "A10-24GB", "MODEL_DIR": str(tmp_path / "w"),
           "CONCURRENCY_LIMIT": "3", "GRADIO_SERVER_NAME": "0.0.0.0", "GRADIO_SERVER_PORT": "9000",
           "MODEL_REPO_TOKEN": "hf_secret_value", "SYSTEM_PROMPT": ""}
    settings = load_settings(env, DEFAULTS)
    assert (settings.max_new_tokens, settings.temperature, settings.hardware) == (64, 0.0, "a10-24gb")
    assert (settings.concurrency_limit, settings.server_name, settings.server_port) == (3, "0.0.0.0", 9000)
    assert settings.model_dir == tmp_path / "w" and settings.system_prompt == ""
    assert "hf_secret_value" not in repr(settings)


@pytest.mark.parametrize(("name", "value", "message"), [
    ("MAX_NEW_TOKENS", "lots", "MAX_NEW_TOKENS='lots' is not a whole number"),
    ("TEMPERATURE", "5", "TEMPERATURE=5 is out of range"),
    ("TOP_P", "0", "TOP_P=0 is out of range"),
    ("REPETITION_PENALTY", "x", "REPETITION_PENALTY='x' is not a number"),
    ("CONCURRENCY_LIMIT", "0", "CONCURRENCY_LIMIT=0 is out of range"),
    ("HARDWARE", "tpu", "HARDWARE='tpu' is not known"),
    ("GRADIO_SERVER_PORT", "99999", "GRADIO_SERVER_PORT=99999 is out of range"),
])
def test_bad_values_raise_one_clear_line(app_modules, name, value, message):
    from xlab_chat.settings import SettingsError, load_settings

    with pytest.raises(SettingsError) as error:
        load_settings({name: value}, DEFAULTS)
    assert message in str(error.value) and " — " in str(error.value)


def test_app_refuses_bad_setting_with_one_line_and_no_traceback(tmp_path: Path):
    folder = render(tmp_path)
    done = subprocess.run([sys.executable, "app.py"], cwd=folder, capture_output=True, text=True, timeout=120,
                          env={"PATH": "/usr/bin:/bin", "MAX_NEW_TOKENS": "-3", "HOME": str(tmp_path)})
    assert done.returncode == 2
    assert done.stderr.strip() == "ERROR: MAX_NEW_TOKENS=-3 is out of range — use a value from 1 to 32768"
    assert "Traceback" not in done.stdout + done.stderr


@pytest.mark.parametrize(("env", "expected"), [
    ({}, "127.0.0.1"),
    ({"SPACE_ID": "me/demo"}, "0.0.0.0"),
    ({"MODELSCOPE_ENVIRONMENT": "studio"}, "0.0.0.0"),
    ({"SPACE_ID": "me/demo", "GRADIO_SERVER_NAME": "127.0.0.1"}, "127.0.0.1"),
    ({"GRADIO_SERVER_NAME": "0.0.0.0"}, "0.0.0.0"),
])
def test_binds_loopback_on_a_laptop_and_all_interfaces_on_a_platform(app_modules, env, expected):
    from xlab_chat.settings import load_settings

    assert load_settings(env, DEFAULTS).server_name == expected


def test_app_turns_analytics_off_unless_the_user_chose(tmp_path: Path):
    folder = render(tmp_path)
    probe = "import os, app; print(os.environ['GRADIO_ANALYTICS_ENABLED'], 'localhost' in os.environ['no_proxy'])"
    for preset, expected in ((None, "False True"), ("True", "True True")):
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "no_proxy": "example.internal"}
        if preset:
            env["GRADIO_ANALYTICS_ENABLED"] = preset
        done = subprocess.run([sys.executable, "-c", probe], cwd=folder, capture_output=True, text=True, timeout=120,
                              env=env)
        assert done.stdout.split()[-2:] == expected.split(), done.stderr


SUPPORTED = tuple(f"3.{minor}." for minor in range(8, 14))
PYTHONS = [path for path in sorted(Path("/root/.pyenv/versions").glob("3.*/bin/python3"))  # those found here
           if path.parent.parent.name.startswith(SUPPORTED)]


def test_settings_json_is_written_for_a_reader_with_real_characters_and_a_prompt_list(tmp_path: Path):
    folder = render(tmp_path, ui_language="zh", app_title="我的学习助手 <v2> & 'more'", validate_model_repo=False,
                    example_prompts=" 请你介绍一下你自己 | 你能帮我做什么？ || 用 Python 写一个快速排序")
    text = (folder / "settings.json").read_text(encoding="utf-8")
    assert "\\u" not in text and '"app_title": "我的学习助手 <v2> & \'more\'"' in text
    assert json.loads(text)["example_prompts"] == ["请你介绍一下你自己", "你能帮我做什么？", "用 Python 写一个快速排序"]
    assert '\n    "你能帮我做什么？",\n' in text  # one prompt a line
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("python", PYTHONS or [Path(sys.executable)], ids=lambda p: p.parent.parent.name)
def test_every_supported_python_reads_the_new_and_the_old_settings_json(tmp_path: Path, python: Path):
    """3.8 to 3.13 read the UTF-8 file with its list, and an app rendered before (a |-joined, escaped string)."""
    folder = render(tmp_path / "new", ui_language="zh", validate_model_repo=False)
    old = dict(json.loads((folder / "settings.json").read_text(encoding="utf-8")),
               example_prompts="\u8bf7\u4f60\u4ecb\u7ecd\u4e00\u4e0b\u4f60\u81ea\u5df1|Hi|")
    (tmp_path / "old.json").write_text(json.dumps(old, indent=2), encoding="ascii")  # as tojson wrote it
    probe = ("import sys; from pathlib import Path; from xlab_chat.settings import load_defaults, load_settings;"
             " [print(load_settings({}, load_defaults(Path(p))).example_prompts) for p in sys.argv[1:]]")
    done = subprocess.run([str(python), "-c", probe, "settings.json", str(tmp_path / "old.json")], cwd=folder,
                          capture_output=True, text=True, timeout=120, encoding="utf-8",
                          env={"PATH": "/usr/bin:/bin", "PYTHONIOENCODING": "utf-8"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["('请你介绍一下你自己', '你能帮我做什么？', '用 Python 写一个快速排序')",
                                        "('请你介绍一下你自己', 'Hi')"]


def test_example_prompts_env_override_is_a_bar_joined_line(app_modules):
    from xlab_chat.settings import load_settings

    listed = dict(DEFAULTS, example_prompts=["一", "二"])
    assert load_settings({}, listed).example_prompts == ("一", "二")
    assert load_settings({"EXAMPLE_PROMPTS": "Hello | How are you?"}, listed).example_prompts == ("Hello",
                                                                                                  "How are you?")
    assert load_settings({"EXAMPLE_PROMPTS": ""}, listed).example_prompts == ()
