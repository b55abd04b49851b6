"""Pre-generation: every answer is checked, every error says what and how to fix, exits 1, shows no traceback.

Also: answers reach the hooks as data (an answer holding quotes or code is never run),
and pasted web addresses are normalised to git URLs, said out loud and recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest
from apprunner import render
from conftest import ROOT, TEMPLATE_APP
from cookiecutter.environment import StrictEnvironment
from cookiecutter.exceptions import FailedHookException

OFFLINE = {"validate_model_repo": False}  # these tests are about the answers, not the model repo


def defaults_of(folder: Path) -> dict:
    return json.loads((folder / "settings.json").read_text(encoding="utf-8"))


def fails_with(tmp_path: Path, capfd, **answers: object) -> str:
    """Render with answers that must be refused; return the hook's stderr."""
    with pytest.raises(FailedHookException) as caught:
        render(tmp_path / "out", **answers)
    assert "exit status: 1" in str(caught.value)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err
    assert err.strip(), "the hook said nothing"
    for line in err.strip().splitlines():
        assert line.startswith("ERROR: ") and " — " in line, line
    assert not (tmp_path / "out" / str(answers.get("app_name", "internlm2-chat-demo"))).exists()
    return err


# ---------------------------------------------------------------- one test per pre-gen error, through cookiecutter


@pytest.mark.parametrize(("answers", "message"), [
    ({"app_name": "My App"}, "ERROR: app_name 'My App' is not a slug — use lower-case letters, digits and single"
                             " dashes, at most 64 characters, e.g. my-app"),
    ({"app_name": "chat--demo"}, "e.g. chat-demo"),
    ({"app_name": "x" * 65}, "at most 64 characters"),
    ({"max_new_tokens": "abc"}, "ERROR: max_new_tokens='abc' is not a whole number — use a whole number from 1 to"
                                " 32768"),
    ({"max_new_tokens": 0}, "ERROR: max_new_tokens=0 is out of range — use a value from 1 to 32768"),
    ({"temperature": "hot"}, "ERROR: temperature='hot' is not a number — use a number from 0.0 to 2.0"),
    ({"temperature": 2.5}, "ERROR: temperature=2.5 is out of range"),
    ({"top_p": 0}, "ERROR: top_p=0 is out of range — use a value from 0.01 to 1.0"),
    ({"repetition_penalty": 0.5}, "ERROR: repetition_penalty=0.5 is out of range — use a value from 1.0 to 2.0"),
    ({"model_repo": ""}, "ERROR: model_repo is empty — answer a git URL"),
    ({"model_repo": "internlm/internlm2-chat-7b"}, "ERROR: model_repo internlm/internlm2-chat-7b is neither a URL nor"
                                                  " an absolute folder — use the full address"),
    ({"model_repo": "ftp://example.com/m.git"}, "uses ftp://, which git cannot clone here"),
    ({"model_repo": "https://user:tok@huggingface.co/a/b"}, "remove it from the URL and set MODEL_REPO_TOKEN"),
    ({"model_repo": "https://huggingface.co/datasets/a/b"}, "is a Hugging Face dataset, not a model"),
    ({"model_repo": "https://modelscope.cn/datasets/a/b"}, "is a ModelScope dataset, not a model"),
    ({"model_repo": "https://openxlab.org.cn/apps/detail/a/b"}, "is not an OpenXLab model page"),
    ({"model_repo": "--upload-pack=touch /tmp/x"}, "starts with '-' or holds spaces"),
    ({"model_revision": ""}, "ERROR: model_revision is empty — answer main"),
    ({"model_revision": "--upload-pack=evil"}, "ERROR: model_revision '--upload-pack=evil' is not a branch, tag or"
                                               " commit name"),
    ({"model_revision": "my branch"}, "is not a branch, tag or commit name"),
    ({"model_repo": "https://huggingface.co/a/b/tree/v1", "model_revision": "v2"},
     "ERROR: model_repo points at revision v1 but model_revision is v2 — answer model_revision v1"),
])
def test_each_bad_answer_is_refused_with_what_and_how(tmp_path: Path, capfd, answers: dict, message: str):
    err = fails_with(tmp_path, capfd, **answers)
    assert message in err


def test_every_problem_is_listed_at_once(tmp_path: Path, capfd):
    err = fails_with(tmp_path, capfd, app_name="Bad Name", top_p=7, model_repo="relative/path")
    assert len(err.strip().splitlines()) == 3


@pytest.mark.parametrize("relative", [False, True], ids=["absolute-template", "cookiecutter-dot"])
def test_cli_exit_code_and_message(tmp_path: Path, relative: bool):
    template, cwd = (".", ROOT) if relative else (str(ROOT), tmp_path)  # `cookiecutter .` passes _repo_dir="."
    done = subprocess.run([sys.executable, "-m", "cookiecutter", "--no-input", "-o", str(tmp_path), template,
                           "max_new_tokens=lots"], capture_output=True, text=True, timeout=120, cwd=cwd)
    assert done.returncode == 1
    assert "ERROR: max_new_tokens='lots' is not a whole number — use a whole number from 1 to 32768" in done.stderr
    assert not (tmp_path / "internlm2-chat-demo").exists()


# ---------------------------------------------------------------- answers cookiecutter's prompts cannot produce


def run_hook(tmp_path: Path, hook: str, project: Optional[Path] = None, **answers: object,
             ) -> subprocess.CompletedProcess:
    """Render one hook as cookiecutter does, with a context we choose, and run it in a project folder."""
    context = {"app_name": "demo", "app_title": "Demo", "model_repo": "https://huggingface.co/a/b",
               "model_revision": "main", "base_model_repo": "", "base_model_revision": "main",
               "visual_encoder_repo": "", "visual_encoder_revision": "main",
               "hardware": "auto", "loader": "native", "platforms": "all",
               "quantize": "auto", "engine": "transformers", "engine_url": "", "engine_model": "",
               "max_new_tokens": 1024,
               "temperature": 0.8, "top_p": 0.8, "repetition_penalty": 1.005, "validate_model_repo": True,
               "_repo_dir": str(ROOT), **answers}
    env = StrictEnvironment(context={"cookiecutter": context}, keep_trailing_newline=True)
    source = (ROOT / "hooks" / hook).read_text(encoding="utf-8")
    script = tmp_path / hook
    script.write_text(env.from_string(source).render(cookiecutter=context), encoding="utf-8")
    if project is None:
        project = tmp_path / "project"
        project.mkdir(exist_ok=True)
    return subprocess.run([sys.executable, str(script)], cwd=project, capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("answers", "message"), [
    ({"hardware": "tpu-v5"}, "ERROR: hardware 'tpu-v5' is not known — answer one of: auto, a10-24gb, a100-40gb, cpu"),
    ({"loader": "magic"}, "ERROR: loader 'magic' is not known — answer one of: native, remote-code"),
    ({"validate_model_repo": "perhaps"}, "ERROR: validate_model_repo 'perhaps' is not yes or no — answer yes"),
])
def test_choices_are_checked_too(tmp_path: Path, answers: dict, message: str):
    done = run_hook(tmp_path, "pre_gen_project.py", **answers)
    assert done.returncode == 1 and message in done.stderr and "Traceback" not in done.stderr


def test_post_gen_hook_checks_the_answers_again(tmp_path: Path):
    """Where the pre-gen hook cannot find the template's folder, the post-gen hook still refuses bad answers."""
    folder = render(tmp_path / "out", **OFFLINE)
    done = run_hook(tmp_path, "post_gen_project.py", project=folder, max_new_tokens="lots", hardware="tpu")
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "ERROR: max_new_tokens='lots' is not a whole number" in done.stderr
    assert "ERROR: hardware 'tpu' is not known" in done.stderr


def test_good_answers_pass(tmp_path: Path):
    done = run_hook(tmp_path, "pre_gen_project.py")
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""


def test_the_pre_gen_hook_leaves_no_bytecode_in_the_template(tmp_path: Path):
    before = {p for p in TEMPLATE_APP.rglob("*.pyc")}
    assert run_hook(tmp_path, "pre_gen_project.py").returncode == 0
    assert {p for p in TEMPLATE_APP.rglob("*.pyc")} == before


# ---------------------------------------------------------------- answers are data, never code


INJECTIONS = [
    "''') ; open({marker!r}, 'w').write('pwned') ; ('''",
    '"""; open({marker!r}, "w").write("pwned"); """',
    "\\'; __import__('os').system('touch {marker}') #",
    '"}}; __import__("os").system("touch {marker}"); x = {{"a": "',
]


@pytest.mark.parametrize("template", INJECTIONS)
def test_an_answer_holding_quotes_or_code_is_not_executed(tmp_path: Path, capfd, template: str):
    marker = tmp_path / "pwned"
    payload = template.format(marker=str(marker))
    folder = render(tmp_path / "out", app_title=payload, description=payload, author=payload, **OFFLINE)
    assert not marker.exists()
    assert defaults_of(folder)["app_title"] == payload  # the answer arrived intact, as data
    assert "Traceback" not in "".join(capfd.readouterr())
    done = run_hook(tmp_path, "pre_gen_project.py", app_title=payload)
    assert done.returncode == 0 and not marker.exists(), done.stderr


def test_a_model_repo_holding_code_is_refused_not_run(tmp_path: Path, capfd):
    marker = tmp_path / "pwned"
    err = fails_with(tmp_path, capfd, model_repo=f'https://x.org/a.git"; __import__("os").system("touch {marker}")')
    assert not marker.exists() and "ERROR: model_repo" in err


# ---------------------------------------------------------------- pasted web addresses are normalised


@pytest.mark.parametrize(("pasted", "git_url", "revision"), [
    ("https://openxlab.org.cn/models/detail/OpenLMLab/internlm2-chat-7b",
     "https://code.openxlab.org.cn/OpenLMLab/internlm2-chat-7b.git", "main"),
    ("https://huggingface.co/internlm/internlm2-chat-7b/tree/v1.1.0",
     "https://huggingface.co/internlm/internlm2-chat-7b", "v1.1.0"),
    ("https://hf.co/internlm/internlm2-chat-1_8b", "https://huggingface.co/internlm/internlm2-chat-1_8b", "main"),
    ("https://huggingface.co/internlm/internlm2-chat-7b/blob/main/config.json",
     "https://huggingface.co/internlm/internlm2-chat-7b", "main"),
    ("https://modelscope.cn/models/Shanghai_AI_Laboratory/internlm2-chat-7b/files",
     "https://www.modelscope.cn/Shanghai_AI_Laboratory/internlm2-chat-7b.git", "main"),
    ("https://www.modelscope.cn/models/Shanghai_AI_Laboratory/internlm2-chat-7b/summary",
     "https://www.modelscope.cn/Shanghai_AI_Laboratory/internlm2-chat-7b.git", "main"),
])
def test_web_addresses_become_git_urls_in_settings_json(tmp_path: Path, capfd, pasted: str, git_url: str,
                                                        revision: str):
    folder = render(tmp_path / "out", model_repo=pasted, **OFFLINE)
    out, _ = capfd.readouterr()
    defaults = defaults_of(folder)
    assert (defaults["model_repo"], defaults["model_revision"]) == (git_url, revision)
    assert f"using its git URL {git_url}" in out and f"settings.json now says model_repo={git_url}" in out
    readme = (folder / "README.md").read_text(encoding="utf-8")
    assert f"`{git_url}`" in readme and f"`{pasted}`" not in readme
    assert not list(folder.glob("*.tmp"))


@pytest.mark.parametrize("git_url", [
    "https://code.openxlab.org.cn/OpenLMLab/internlm2-chat-7b.git",
    "https://huggingface.co/internlm/internlm2-chat-7b",
    "https://www.modelscope.cn/Shanghai_AI_Laboratory/internlm2-chat-7b.git",
    "https://modelscope.cn/models/Shanghai_AI_Laboratory/internlm2-chat-7b.git",
    "git@github.com:someone/model.git",
    "ssh://git@example.com/someone/model.git",
    "file:///srv/models/tiny.git",
    "/srv/models/tiny",
])
def test_git_urls_and_folders_are_kept_as_they_are(tmp_path: Path, capfd, git_url: str):
    folder = render(tmp_path / "out", model_repo=git_url, **OFFLINE)
    assert defaults_of(folder)["model_repo"] == git_url
    assert "using its git URL" not in capfd.readouterr().out


def test_repo_url_module(app_modules):
    from xlab_chat.model import repo_url

    parsed = repo_url.normalise("huggingface.co/internlm/internlm2-chat-7b/tree/refs%2Fpr%2F3")
    assert (parsed.hub, parsed.git_url, parsed.revision) == ("huggingface", "https://huggingface.co/internlm/"
                                                             "internlm2-chat-7b", "refs/pr/3")
    assert parsed.web_url == "https://huggingface.co/internlm/internlm2-chat-7b"
    ms = repo_url.normalise("https://modelscope.cn/models/a/b/files?Revision=v2")
    assert (ms.hub, ms.revision, ms.web_url) == ("modelscope", "v2", "https://modelscope.cn/models/a/b")
    ox = repo_url.normalise("https://code.openxlab.org.cn/o/r.git")
    assert (ox.hub, ox.changed, ox.web_url) == ("openxlab", False, "https://openxlab.org.cn/models/detail/o/r")
    assert repo_url.normalise("http://127.0.0.1:8000/m.git").hub == "other"
    assert repo_url.hub_of("/srv/models/x") == "local"


def test_resolve_source_uses_the_git_url_and_implied_revision(app_modules):
    from xlab_chat.model.source import resolve_source

    source = resolve_source("https://huggingface.co/a/b/tree/v2", "main")
    assert (source.url, source.revision) == ("https://huggingface.co/a/b", "v2")
    assert resolve_source("https://huggingface.co/a/b/tree/v2", "v3").revision == "v3"


# ---------------------------------------------------------------- answers the chosen engine does not use

SERVER = {"engine": "openai", "engine_url": "http://10.0.0.5:23333/v1", "engine_model": "internlm2-chat"}


@pytest.mark.parametrize("model_repo", ["", "not a url", "https://huggingface.co/datasets/a/b"])
def test_engine_openai_renders_without_a_usable_model_repo(tmp_path: Path, capfd, app_modules, model_repo: str):
    """The server holds the model: model_repo (and its revision) cannot block rendering, and the app starts."""
    folder = render(tmp_path / "out", model_repo=model_repo, model_revision="", **SERVER, **OFFLINE)
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "ERROR" not in err
    assert ("Note: engine=openai ignores model_repo (the model runs on the server at engine_url)." in out) == bool(
        model_repo)
    assert defaults_of(folder)["model_repo"] == model_repo
    from xlab_chat.settings import load_defaults, load_settings

    settings = load_settings({}, load_defaults(folder / "settings.json"))
    assert (settings.engine, settings.engine_url, settings.model_repo) == ("openai", SERVER["engine_url"], model_repo)


def test_ignored_answers_are_named_in_one_line(tmp_path: Path, capfd):
    render(tmp_path / "a", loader="remote-code", quantize="int8", **SERVER, **OFFLINE)
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("Note:")]
    assert lines == ["Note: engine=openai ignores model_repo, loader, quantize (the model runs on the server at"
                     " engine_url)."]
    render(tmp_path / "b", engine_url="http://10.0.0.5:23333/v1", **OFFLINE)
    lines = [line for line in capfd.readouterr().out.splitlines() if line.startswith("Note:")]
    assert lines == ["Note: engine=transformers ignores engine_url (only engine=openai uses them)."]
    render(tmp_path / "c", **OFFLINE)
    assert "Note:" not in capfd.readouterr().out


def test_engine_openai_without_a_model_repo_checks_the_server_instead(tmp_path: Path, capfd):
    from git_http_server import refused_port

    sock, port = refused_port()
    with sock:
        render(tmp_path / "out", model_repo="", **dict(SERVER, engine_url=f"http://127.0.0.1:{port}/v1"),
               validate_model_repo=True)
    out, err = capfd.readouterr()
    assert "Engine server check: http://127.0.0.1:" in out and "Model repo check" not in out
    assert "Traceback" not in out + err
