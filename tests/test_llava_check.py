"""The repo check of an XTuner LLaVA folder (model/llava_check.py) on real folders: parts, sizes, adapters, base."""

from __future__ import annotations

import json
from pathlib import Path

import llava_fixture as lf
import pytest
from internlm2_fixture import build_internlm2


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("llava-check")
    base = build_internlm2(root / "base", hidden=64, max_position_embeddings=256)
    clip = lf.build_clip(root / "clip")
    return {"base": base, "clip": clip, "full": lf.build_llava_folder(root / "llava", base, clip, safe=True),
            "other-base": build_internlm2(root / "other-base", hidden=32),
            "other-clip": lf.build_clip(root / "other-clip", hidden=48)}


def run(app_modules: Path, folder: Path, base: str, clip: Path) -> list:
    from xlab_chat.model import check
    from xlab_chat.model.llava_check import check_llava_repo, is_llava_listing

    sizes, lfs = check.scan_folder(folder)
    listing = check.Listing(folder, sizes, lfs, local_folder=True)
    assert is_llava_listing(list(sizes))
    return check_llava_repo(
        listing, str(folder), base, "main", str(clip), "main",
        lambda repo, revision: check.check_repo(repo, revision, hardware="cpu"),
        lambda repo, revision: json.loads((Path(repo) / "config.json").read_text()), check.Check,
        {"ok": check.OK, "warn": check.WARN, "fail": check.FAIL, "info": check.INFO})


def failed(lines: list) -> dict:
    return {line.title: line.detail for line in lines if line.status == "fail"}


def test_a_complete_folder_passes(world: dict, app_modules: Path) -> None:
    lines = run(app_modules, world["full"], str(world["base"]), world["clip"])
    titles = {line.title: line.status for line in lines}
    assert failed(lines) == {}
    for title in ("2 LLaVA parts", "4 projector fits the LLM", "4 LLM adapter fits the base", "4 projector fits CLIP",
                  "4 visual adapter fits CLIP", "7 fits, with images", "base 2 config.json and model type"):
        assert title in titles


def test_no_base_names_the_official_one(world: dict, app_modules: Path) -> None:
    problems = failed(run(app_modules, world["full"], "", world["clip"]))
    assert "no base LLM was given" in problems["3 base model"]


def test_the_wrong_base_and_the_wrong_clip_are_named(world: dict, app_modules: Path) -> None:
    problems = failed(run(app_modules, world["full"], str(world["other-base"]), world["other-clip"]))
    assert "the LLM's hidden size is 32" in problems["4 projector fits the LLM"]
    assert "4 LLM adapter fits the base" in problems
    assert "the tower's hidden size is 48" in problems["4 projector fits CLIP"]


def test_a_folder_without_projector_weights_fails(world: dict, app_modules: Path, tmp_path: Path) -> None:
    import shutil

    broken = shutil.copytree(world["full"], tmp_path / "broken")
    (broken / "projector" / "model.safetensors").unlink()
    problems = failed(run(app_modules, broken, str(world["base"]), world["clip"]))
    assert "no model.safetensors or pytorch_model.bin" in problems["2 LLaVA parts"]


def test_downloads_take_only_the_files_the_loaders_read(world: dict, app_modules: Path, tmp_path: Path) -> None:
    """CLIP's repo holds torch, safetensors, TensorFlow and Flax copies: only model.safetensors comes down. A LLaVA
    folder (no config.json at its top) is a complete download too."""
    from xlab_chat.model.download import ensure_model
    from xlab_chat.model.source import resolve_source

    clip = ensure_model(resolve_source(lf.publish_tree(world["clip"], tmp_path / "clip.git"), "main"),
                        tmp_path / "clip")
    assert sorted(p.name for p in clip.iterdir() if p.is_file()) == [".gitattributes", "config.json",
                                                                     "model.safetensors", "preprocessor_config.json"]
    llava = ensure_model(resolve_source(lf.publish_tree(world["full"], tmp_path / "llava.git"), "main"),
                         tmp_path / "llava")
    got = sorted(str(p.relative_to(llava)) for p in llava.rglob("*") if p.is_file() and ".git" not in p.parts
                 and p.name != ".gitattributes")
    want = sorted(str(p.relative_to(world["full"])) for p in world["full"].rglob("*") if p.is_file())
    assert got == want


def test_the_whole_check_runs_the_llava_checks_on_published_repos(world: dict, app_modules: Path,
                                                                   tmp_path: Path) -> None:
    """check_repo (the hook's, the CLI's and the app's pre-flight check) on three real LFS remotes: the LLaVA folder,
    its base LLM and its CLIP tower; without a base, and with a server engine, it fails with the fix."""
    from xlab_chat.model import check

    urls = {name: lf.publish_tree(world[name], tmp_path / f"{name}.git") for name in ("full", "base", "clip")}
    report = check.check_repo(urls["full"], hardware="cpu", base_repo=urls["base"], visual_repo=urls["clip"])
    assert not report.failed, report.render()
    titles = [line.title for line in report.checks]
    assert "2 LLaVA parts" in titles and "4 projector fits CLIP" in titles and "base 5 weights" in titles
    alone = check.check_repo(urls["full"], hardware="cpu", visual_repo=urls["clip"])
    assert [line.title for line in alone.failed] == ["3 base model"]
    assert "internlm2-chat" in alone.failed[0].fix
    served = check.check_repo(urls["full"], hardware="a10-24gb", engine="vllm", base_repo=urls["base"],
                              visual_repo=urls["clip"])
    assert any(line.title == "9 engine vllm" and "XTuner's LLaVA format" in line.detail for line in served.failed)
