"""Download with real git + git-lfs from a local bare repo: once, atomically, verified."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest


@pytest.fixture()
def resolve_source(app_modules):
    from xlab_chat.model.source import resolve_source

    return resolve_source


@pytest.fixture()
def model_repo(app_modules):
    from xlab_chat.model import download as model_repo

    return model_repo


def test_download_pulls_real_weights_and_records_them(model_repo, resolve_source, remote_copy: Path,
                                                      tmp_path: Path, tiny_model):
    target = tmp_path / "model"
    seen = []
    model_repo.ensure_model(resolve_source(remote_copy.as_uri(), "main"), target,
                            progress=lambda stage, done, total: seen.append(stage))
    weights = target / "model.safetensors"
    assert weights.read_bytes() == (tiny_model / "model.safetensors").read_bytes()
    assert (target / "tokenizer.model").read_bytes() == (tiny_model / "tokenizer.model").read_bytes()
    assert "checking" in seen and "verifying" in seen
    assert not (target / ".git" / "lfs" / "objects").exists()  # the duplicate LFS store is freed
    leftovers = sorted(p.name for p in tmp_path.iterdir())
    assert leftovers == ["model", "remote-copy.git", "remote-copy.git.work"] or "model" in leftovers
    assert not any(name.startswith(".model") for name in leftovers)


def test_second_start_uses_local_copy_without_network(model_repo, resolve_source, remote_copy: Path,
                                                      tmp_path: Path, capsys):
    source = resolve_source(remote_copy.as_uri(), "main")
    target = tmp_path / "model"
    model_repo.ensure_model(source, target)
    shutil.rmtree(remote_copy)  # the remote is gone: any network step would now fail
    assert model_repo.ensure_model(source, target) == target
    assert "no download" in capsys.readouterr().out


def test_pointer_file_in_place_is_detected_and_pulled_again(model_repo, resolve_source, remote_copy: Path,
                                                            tmp_path: Path, tiny_model):
    source = resolve_source(remote_copy.as_uri(), "main")
    target = tmp_path / "model"
    model_repo.ensure_model(source, target)
    weights = target / "model.safetensors"
    pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{'0' * 64}\nsize {weights.stat().st_size}\n"
    weights.unlink()  # never write through: the file may be hardlinked to the fixture's LFS store
    weights.write_text(pointer)
    with pytest.raises(model_repo.RepoError, match="pointer"):
        model_repo.verify_checkout(target)
    model_repo.ensure_model(source, target)
    assert weights.read_bytes() == (tiny_model / "model.safetensors").read_bytes()


def test_truncated_weights_are_refused(model_repo, resolve_source, remote_copy: Path, tmp_path: Path):
    source = resolve_source(remote_copy.as_uri(), "main")
    target = tmp_path / "model"
    model_repo.ensure_model(source, target)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.unlink()
    weights.write_bytes(data[: len(data) // 2])
    assert not model_repo.local_copy_is_good(target, source)


def test_missing_git_lfs_is_a_clear_error(model_repo, resolve_source, remote_copy: Path, tmp_path: Path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    os.symlink(shutil.which("git"), bin_dir / "git")  # git without git-lfs on PATH
    monkeypatch.setenv("PATH", str(bin_dir))
    with pytest.raises(model_repo.RepoError, match="git-lfs is not installed") as error:
        model_repo.ensure_model(resolve_source(remote_copy.as_uri(), "main"), tmp_path / "model")
    assert "apt-get install git-lfs" in error.value.fix
    assert not (tmp_path / "model").exists()


def test_unknown_revision_and_missing_repo_say_what_to_fix(model_repo, resolve_source, remote_copy: Path,
                                                           tmp_path: Path):
    with pytest.raises(model_repo.RepoError, match="revision not found") as error:
        model_repo.ensure_model(resolve_source(remote_copy.as_uri(), "no-such-branch"), tmp_path / "m1")
    assert "MODEL_REVISION" in error.value.fix
    with pytest.raises(model_repo.RepoError, match="does not exist"):
        model_repo.ensure_model(resolve_source((tmp_path / "nowhere.git").as_uri(), "main"), tmp_path / "m1")
    assert not (tmp_path / "m1").exists()
    assert not any(p.name.startswith(".m1") for p in tmp_path.iterdir())


def test_commit_revision_and_local_folder(model_repo, resolve_source, remote_copy: Path, tmp_path: Path, tiny_model):
    import subprocess

    commit = subprocess.run(["git", "rev-parse", "main"], cwd=remote_copy, capture_output=True, text=True).stdout
    commit = commit.strip()
    target = tmp_path / "model"
    model_repo.ensure_model(resolve_source(remote_copy.as_uri(), commit), target)
    assert model_repo.read_marker(target)["commit"] == commit
    local = resolve_source(str(tiny_model), "main")
    assert local.local_folder == tiny_model
    assert model_repo.ensure_model(local, tmp_path / "unused") == tiny_model


def test_not_enough_disk_names_both_numbers(model_repo, resolve_source, remote_copy: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setenv("MODEL_MIN_FREE_BYTES", str(10**15))
    with pytest.raises(model_repo.RepoError, match=r"needs 0\.\d+ GB .* GB are free"):
        model_repo.ensure_model(resolve_source(remote_copy.as_uri(), "main"), tmp_path / "model")
    assert not (tmp_path / "model").exists()
