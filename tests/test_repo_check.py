"""The model repo check on real local repos (no network): one broken repo per case, built from the tiny model.

Each case goes through repo_check.check_repo; the exit policy goes through the real
post-generation hook (cookiecutter) and ``python -m xlab_chat check``; the token
cases through a loopback smart-HTTP + LFS server that requires Basic auth.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import tinymodel
from apprunner import render
from cookiecutter.exceptions import FailedHookException
from git_http_server import GitHTTPServer, SilentServer, refused_port

TOKEN = "tok-3f9a7c1e-very-secret"
USER = "alice"


@pytest.fixture()
def rc(app_modules):
    from xlab_chat.model import check as repo_check

    return repo_check


@pytest.fixture()
def make_repo(tiny_model: Path, tmp_path: Path) -> Callable[..., str]:
    """Copy the tiny model, let the test break the copy, publish it; return the bare repo's file:// URL."""

    def make(name: str, edit: Optional[Callable[[Path], None]] = None, lfs_patterns: tuple = tinymodel.LFS_PATTERNS,
             ) -> str:
        folder = tmp_path / f"{name}-src"
        shutil.copytree(tiny_model, folder)
        if edit is not None:
            edit(folder)
        return tinymodel.publish(folder, tmp_path / f"{name}.git", lfs_patterns=lfs_patterns)

    return make


def edit_json(path: Path, **changes: object) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def statuses(report) -> dict:
    return {check.title.split()[0]: check.status for check in report.checks}


def line(report, number: str) -> str:
    return next(c for c in report.checks if c.title.startswith(number + " ")).line({"ok": "✓", "warn": "⚠",
                                                                                     "fail": "✗", "skip": "-"})


# ---------------------------------------------------------------- a good repo, then one break per case


def test_good_repo_passes_every_check(rc, make_repo):
    report = rc.check_repo(make_repo("good"), "main", "a10-24gb")
    assert statuses(report) == {str(n): "ok" for n in range(1, 8)}, report.render()
    assert report.ok and not report.warnings
    assert "model_type llama" in line(report, "2") and "in tokenizer_config.json" in line(report, "4")


def test_no_tokenizer(rc, make_repo):
    def edit(folder: Path) -> None:
        (folder / "tokenizer.model").unlink()
        (folder / "tokenizer.json").unlink()

    report = rc.check_repo(make_repo("no-tokenizer", edit), "main", "a10-24gb")
    assert statuses(report)["3"] == "fail" and not report.ok
    assert "✗ 3 tokenizer: no tokenizer.model or tokenizer.json — upload the tokenizer files" in line(report, "3")


def test_no_config_json(rc, make_repo):
    report = rc.check_repo(make_repo("no-config", lambda f: (f / "config.json").unlink()), "main")
    assert statuses(report)["2"] == "fail"
    assert "config.json is missing" in line(report, "2") and "—" in line(report, "2")
    assert statuses(report)["7"] == "skip"  # nothing to size without a config


def test_no_weights(rc, make_repo):
    report = rc.check_repo(make_repo("no-weights", lambda f: (f / "model.safetensors").unlink()), "main")
    assert statuses(report)["5"] == "fail"
    assert "no weights (*.safetensors or *.bin) — push the weights" in line(report, "5")


def test_a_broken_lora_adapter_is_named_with_its_fix(rc, make_repo):
    """An adapter repo whose adapter_config.json is not a LoRA one (tests/test_adapter_e2e.py has good ones)."""
    def edit(folder: Path) -> None:
        (folder / "model.safetensors").unlink()
        (folder / "adapter_config.json").write_text("{}", encoding="utf-8")

    report = rc.check_repo(make_repo("adapter", edit), "main")
    line = next(c for c in report.checks if c.title == "2 LoRA adapter")
    assert line.status == "fail" and "peft_type" in line.detail and "LoRA" in line.detail and not report.ok


def test_weights_not_in_lfs_is_a_warning(rc, make_repo):
    report = rc.check_repo(make_repo("plain-blobs", lfs_patterns=()), "main", "a10-24gb")
    assert statuses(report)["6"] == "warn" and report.ok
    assert "plain git blobs" in line(report, "6") and "git lfs track" in line(report, "6")


def test_unknown_model_type(rc, make_repo):
    report = rc.check_repo(make_repo("unknown-type", lambda f: edit_json(f / "config.json", model_type="frobnicator")))
    assert statuses(report)["2"] == "fail"
    assert "model_type frobnicator" in line(report, "2") and "no auto_map" in line(report, "2")


def test_auto_map_naming_missing_files(rc, make_repo):
    auto_map = {"AutoConfig": "configuration_tiny.TinyConfig", "AutoModelForCausalLM": "modeling_tiny.TinyForCausalLM"}

    def edit(folder: Path) -> None:
        edit_json(folder / "config.json", auto_map=auto_map)
        (folder / "configuration_tiny.py").write_text("# present\n", encoding="utf-8")

    url = make_repo("auto-map", edit)
    remote = rc.check_repo(url, "main", loader="remote-code")
    assert statuses(remote)["2"] == "fail"
    assert "modeling_tiny.py" in line(remote, "2") and "configuration_tiny.py" not in line(remote, "2")
    native = rc.check_repo(url, "main", loader="native")  # llama runs without the repo's code: only a warning
    assert statuses(native)["2"] == "warn" and native.ok


def test_remote_code_model_type_needs_the_remote_code_loader(rc, make_repo):
    def edit(folder: Path) -> None:
        edit_json(folder / "config.json", model_type="tinything", auto_map={"AutoModelForCausalLM": "modeling_t.T"})
        (folder / "modeling_t.py").write_text("# code\n", encoding="utf-8")

    url = make_repo("remote-only", edit)
    assert statuses(rc.check_repo(url, "main", loader="remote-code"))["2"] == "ok"
    native = rc.check_repo(url, "main", loader="native")
    assert statuses(native)["2"] == "fail" and "loader=remote-code" in line(native, "2")


def test_index_naming_a_missing_shard(rc, make_repo):
    def edit(folder: Path) -> None:
        index = {"metadata": {"total_size": 10}, "weight_map": {"a": "model.safetensors", "b": "model-2.safetensors"}}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")

    report = rc.check_repo(make_repo("bad-index", edit), "main")
    assert statuses(report)["5"] == "fail" and "model-2.safetensors" in line(report, "5")


def test_thirty_gigabyte_pointers_do_not_fit_an_a10(rc, tiny_model: Path, tmp_path: Path, monkeypatch):
    """Pointer files written by hand, in a repo with no LFS objects at all: the check never downloads."""
    folder = tmp_path / "big-src"
    shutil.copytree(tiny_model, folder)
    edit_json(folder / "config.json", dtype="bfloat16", torch_dtype="bfloat16", num_hidden_layers=48,
              num_attention_heads=48, num_key_value_heads=8, hidden_size=6144, head_dim=128)
    (folder / "model.safetensors").unlink()
    shards = {f"model-0000{i}-of-00002.safetensors": 15_000_000_000 for i in (1, 2)}
    for name, size in shards.items():
        (folder / name).write_text(f"version https://git-lfs.github.com/spec/v1\noid sha256:{'ab' * 32}\n"
                                   f"size {size}\n", encoding="ascii")
    index = {"metadata": {"total_size": 29_999_000_000}, "weight_map": {"x": list(shards)[0], "y": list(shards)[1]}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index), encoding="utf-8")
    monkeypatch.setenv("GIT_LFS_SKIP_PUSH", "1")  # git-lfs's pre-push hook would look for the objects
    url = tinymodel.publish(folder, tmp_path / "big.git", lfs_patterns=())
    monkeypatch.delenv("GIT_LFS_SKIP_PUSH")
    assert not list((tmp_path / "big.git").glob("lfs/objects/*"))  # no LFS object anywhere
    a10 = rc.check_repo(url, "main", "a10-24gb")
    assert statuses(a10)["5"] == "ok"
    assert statuses(a10)["6"] == "fail" and "2 of 2 LFS object(s)" in line(a10, "6")  # pointers with no objects
    assert statuses(a10)["7"] == "fail", a10.render()
    assert "15.00B parameters" in line(a10, "7") and "answer hardware a100-40gb" in line(a10, "7")
    a100 = rc.check_repo(url, "main", "a100-40gb")
    assert statuses(a100)["7"] in ("ok", "warn")
    assert statuses(rc.check_repo(url, "main", "auto"))["7"] == "ok"


def test_cpu_compares_with_this_machines_memory(rc, make_repo, monkeypatch):
    url = make_repo("cpu")
    assert statuses(rc.check_repo(url, "main", "cpu"))["7"] == "ok"
    from xlab_chat.model import fit_check

    monkeypatch.setattr(fit_check, "machine_memory", lambda: 1024)
    report = rc.check_repo(url, "main", "cpu")
    assert statuses(report)["7"] == "warn" and report.ok and "smaller model" in line(report, "7")


def test_modelscope_repo_without_configuration_json(rc, make_repo):
    url = make_repo("ms")
    report = rc.check_repo(url, "main", hub="modelscope")
    assert "⚠ 8 ModelScope configuration.json: missing" in line(report, "8")
    with_file = make_repo("ms-ok", lambda f: (f / "configuration.json").write_text('{"framework": "pytorch"}'))
    assert statuses(rc.check_repo(with_file, "main", hub="modelscope"))["8"] == "ok"
    assert "8" not in statuses(rc.check_repo(url, "main"))  # only ModelScope repos get check 8


def test_local_model_folder_is_checked_in_place(rc, tiny_model: Path):
    report = rc.check_repo(str(tiny_model), "main", "a10-24gb")
    assert report.ok and "used as it is" in line(report, "1") and statuses(report)["6"] == "ok"


# ---------------------------------------------------------------- reaching the repo


def test_missing_path(rc, tmp_path: Path):
    for repo in (str(tmp_path / "nowhere"), (tmp_path / "nowhere.git").as_uri()):
        report = rc.check_repo(repo, "main")
        assert statuses(report)["1"] == "fail" and not report.unreachable, report.render()
        assert "does not exist" in line(report, "1")


def test_wrong_revision(rc, make_repo):
    report = rc.check_repo(make_repo("rev"), "no-such-branch")
    assert statuses(report)["1"] == "fail"
    assert "revision not found" in line(report, "1") and "model_revision" in line(report, "1")
    assert statuses(rc.check_repo(make_repo("rev2"), "0123456789abcdef"))["1"] == "fail"  # an unknown commit too


def test_refused_port_is_a_warning_within_seconds(rc):
    sock, port = refused_port()
    with sock:
        start = time.monotonic()
        report = rc.check_repo(f"http://127.0.0.1:{port}/model.git", "main")
    assert time.monotonic() - start < 10
    assert report.unreachable and report.ok and statuses(report)["1"] == "warn"
    assert "python -m xlab_chat check" in line(report, "1")


def test_stalled_host_ends_within_the_time_bound(rc, monkeypatch):
    monkeypatch.setenv("MODEL_CHECK_TIMEOUT", "3")
    with SilentServer() as silent:
        start = time.monotonic()
        report = rc.check_repo(f"http://127.0.0.1:{silent.port}/model.git", "main")
        took = time.monotonic() - start
        assert silent.held, "git never connected"
        for connection in silent.held:  # git's HTTP helper was killed too: its connection is closed, not left open
            connection.settimeout(5)
            while connection.recv(65536):
                pass
    assert took < 10, took
    assert report.unreachable and report.ok and "no answer within 3 s" in line(report, "1")


def test_time_bound_is_at_most_sixty_seconds(rc):
    assert rc.DEFAULT_TIMEOUT <= 60 and rc.MAX_TIMEOUT <= 60
    assert rc.check_timeout({}) == rc.DEFAULT_TIMEOUT
    assert rc.check_timeout({"MODEL_CHECK_TIMEOUT": "600"}) == 60
    assert rc.check_timeout({"MODEL_CHECK_TIMEOUT": "nonsense"}) == rc.DEFAULT_TIMEOUT


# ---------------------------------------------------------------- the exit policy, through the real hooks


def test_hook_fails_generation_on_a_broken_repo_and_says_how_to_keep_it(make_repo, tmp_path: Path, capfd):
    url = make_repo("hook-broken", lambda f: (f / "model.safetensors").unlink())
    with pytest.raises(FailedHookException):
        render(tmp_path / "out", model_repo=url, app_name="broken-app")
    out, err = capfd.readouterr()
    assert "✗ 5 weights: no weights" in out
    assert "ERROR: the model repo check found 1 problem(s)" in err and "--keep-project-on-failure" in err
    assert "validate_model_repo=no" in err and "Traceback" not in out + err
    assert not (tmp_path / "out" / "broken-app").exists()  # cookiecutter removed it
    kept = render(tmp_path / "out", model_repo=url, validate_model_repo=False)
    assert json.loads((kept / "settings.json").read_text())["model_repo"] == url
    assert "python -m xlab_chat check" in capfd.readouterr().out


def test_hook_passes_on_a_good_repo(make_repo, tmp_path: Path, capfd):
    folder = render(tmp_path / "out", model_repo=make_repo("hook-good"), hardware="a10-24gb")
    out, _ = capfd.readouterr()
    assert "✓ 7 fits a10-24gb" in out and "passed every check" in out
    assert not list(folder.rglob("__pycache__"))


def test_hook_warns_and_succeeds_when_the_host_cannot_be_reached(tmp_path: Path, capfd):
    sock, port = refused_port()
    with sock:
        folder = render(tmp_path / "out", model_repo=f"http://127.0.0.1:{port}/m.git")
    out, _ = capfd.readouterr()
    assert folder.is_dir() and "WARNING: the model host could not be reached" in out
    assert "python -m xlab_chat check" in out


def test_cli_exit_codes(make_repo, tmp_path: Path):
    good = render(tmp_path / "good", model_repo=make_repo("cli-good"), validate_model_repo=False)
    env = {k: v for k, v in os.environ.items() if k not in ("MODEL_REPO", "MODEL_PATH", "HARDWARE", "LOADER")}
    done = subprocess.run([sys.executable, "-m", "xlab_chat", "check", "--hardware", "cpu"], cwd=good, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "✓ 7 fits cpu" in done.stdout
    broken = make_repo("cli-broken", lambda f: (f / "config.json").unlink())
    done = subprocess.run([sys.executable, "-m", "xlab_chat", "check", "--repo", broken], cwd=good, env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "✗ 2 config.json" in done.stdout and done.stderr.startswith("ERROR: ")
    assert "Traceback" not in done.stderr
    done = subprocess.run([sys.executable, "-m", "xlab_chat", "frobnicate"], cwd=good, env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("ERROR: unknown command")


# ---------------------------------------------------------------- a private repo behind a token


@pytest.fixture()
def private_host(tiny_model: Path, tmp_path: Path):
    root = tmp_path / "host"
    root.mkdir()
    tinymodel.publish(tiny_model, root / "tiny.git")
    with GitHTTPServer(root, USER, TOKEN) as host:
        yield host


def assert_token_absent(*texts: str, folders: tuple = ()) -> None:
    forms = [TOKEN, base64.b64encode(f"{USER}:{TOKEN}".encode()).decode()]
    for text in texts:
        assert not any(form in text for form in forms)
    for folder in folders:
        for path in Path(folder).rglob("*"):
            if path.is_file():
                data = path.read_bytes()
                assert not any(form.encode() in data for form in forms), path


def test_private_repo_check_and_download_with_a_token(private_host, tmp_path: Path, capfd, monkeypatch, app_modules):
    from xlab_chat.model import download as model_repo
    from xlab_chat.model.source import resolve_source

    url = private_host.url("tiny.git")
    monkeypatch.setenv("MODEL_REPO_TOKEN", TOKEN)
    monkeypatch.setenv("MODEL_REPO_USER", USER)
    folder = render(tmp_path / "out", model_repo=url, hardware="a10-24gb")
    out, err = capfd.readouterr()
    assert "passed every check" in out and "✓ 1 reachable" in out, out + err
    target = tmp_path / "downloaded"
    model_repo.ensure_model(resolve_source(url, "main"), target, token=TOKEN, user=USER)
    assert (target / "model.safetensors").stat().st_size > 100_000  # the real weights, not a pointer
    assert model_repo.read_pointer(target / "model.safetensors") is None
    out2, err2 = capfd.readouterr()
    assert all(sent and accepted for _, _, sent, accepted in private_host.requests)
    assert any("/info/lfs/objects/batch" in path for _, path, _, _ in private_host.requests)
    assert_token_absent(out, err, out2, err2, folders=(folder, target))


def test_private_repo_without_a_token_fails_clearly(private_host, tmp_path: Path, capfd, monkeypatch, app_modules):
    from xlab_chat.model import download as model_repo
    from xlab_chat.model.source import resolve_source

    monkeypatch.delenv("MODEL_REPO_TOKEN", raising=False)
    url = private_host.url("tiny.git")
    folder = render(tmp_path / "out", model_repo=url)  # a missing token is a warning: the app is still made
    out, err = capfd.readouterr()
    assert folder.is_dir() and "needs a login and MODEL_REPO_TOKEN is not set" in out
    assert "set MODEL_REPO_TOKEN" in out
    with pytest.raises(model_repo.RepoError, match="needs a login") as caught:
        model_repo.ensure_model(resolve_source(url, "main"), tmp_path / "dl")
    assert "MODEL_REPO_TOKEN" in caught.value.fix
    assert not (tmp_path / "dl").exists()
    assert_token_absent(out, err, folders=(folder,))


def test_private_repo_with_a_wrong_token_fails_generation(private_host, tmp_path: Path, capfd, monkeypatch):
    monkeypatch.setenv("MODEL_REPO_TOKEN", "wrong-" + TOKEN[::-1])
    monkeypatch.setenv("MODEL_REPO_USER", USER)
    with pytest.raises(FailedHookException):
        render(tmp_path / "out", model_repo=private_host.url("tiny.git"))
    out, err = capfd.readouterr()
    assert "✗ 1 reachable, revision exists: the repo refused MODEL_REPO_TOKEN" in out
    assert TOKEN[::-1] not in out + err
