"""A ~300 MB model: git-lfs download from a local file:// remote against cp, and peak RSS while loading.

  download      ``git lfs pull`` into a smudge-skipped clone ÷ ``cp`` of the same LFS objects (both from a warm
                page cache); also the app's whole model_repo.download (clone, pull, verify, rename) ÷ cp
  load memory   peak RSS from the app's Engine.load through its first generated token (a fresh interpreter,
                VmHWM reset through /proc/self/clear_refs after the imports) ÷ (weight bytes + the interpreter's
                RSS before loading); the first token counts because transformers maps safetensors lazily

Usage: .venv/bin/python bench/download_memory.py [--runs 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
from pathlib import Path

from common import OUT, clock, endless_model, median, run_worker, write

BIG = {"hidden": 1024, "layers": 8, "shard_size": "100MB"}  # ~76M parameters, ~305 MB in fp32


def big_remote() -> tuple:
    import tinymodel

    model = endless_model(**BIG)
    root = OUT / "remote-big"
    bare = root / "model.git"
    if not (bare / "HEAD").exists():
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        tinymodel.publish(model, bare)
    return model, bare


def _git(*args: str, cwd: Path, env: dict) -> None:
    subprocess.run(["git", *args], cwd=cwd, env=env, check=True, capture_output=True)


def _lfs_pull(bare: Path, work: Path) -> float:
    """A smudge-skipped clone (not timed), then ``git lfs pull`` (timed)."""
    env = {**os.environ, "GIT_LFS_SKIP_SMUDGE": "1", "GIT_TERMINAL_PROMPT": "0"}
    shutil.rmtree(work, ignore_errors=True)
    subprocess.run(["git", "clone", "-q", bare.as_uri(), str(work)], env=env, check=True, capture_output=True)
    started = clock()
    _git("lfs", "pull", cwd=work, env={**env, "GIT_LFS_SKIP_SMUDGE": "0"})
    return clock() - started


def _app_download(bare: Path, target: Path) -> float:
    from xlab_chat.model import download as model_repo
    from xlab_chat.model.source import ModelSource

    shutil.rmtree(target, ignore_errors=True)
    started = clock()
    model_repo.download(ModelSource(url=bare.as_uri(), revision="main"), target)
    return clock() - started


def _cp(objects: list, target: Path) -> float:
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    started = clock()
    subprocess.run(["cp", "--reflink=never", *map(str, objects), str(target)], check=True)
    return clock() - started


def measure(runs: int = 3) -> dict:
    model, bare = big_remote()
    objects = sorted(p for p in (bare / "lfs" / "objects").rglob("*") if p.is_file())
    total = sum(p.stat().st_size for p in objects)
    scratch = OUT / "download-scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    _cp(objects, scratch / "cp")  # warm the page cache for every contender
    pulls, app, cps = [], [], []
    for _ in range(runs):
        cps.append(_cp(objects, scratch / "cp"))
        pulls.append(_lfs_pull(bare, scratch / "clone"))
        cps.append(_cp(objects, scratch / "cp"))
        app.append(_app_download(bare, scratch / "app-model"))
    pull_ratios = [p / c for p, c in zip(pulls, cps[0::2])]
    app_ratios = [a / c for a, c in zip(app, cps[1::2])]
    memory = [run_worker(["loadmem", str(scratch / "app-model")]) for _ in range(runs)]
    ratios = [m["peak_rss"] / (m["weight_bytes"] + m["baseline_rss"]) for m in memory]
    shutil.rmtree(scratch / "cp", ignore_errors=True)
    shutil.rmtree(scratch / "clone", ignore_errors=True)
    return {
        "lfs_bytes": total, "files": len(objects),
        "cp_s": median(cps), "lfs_pull_s": median(pulls), "app_download_s": median(app),
        "download": median(pull_ratios), "download_ratios": pull_ratios, "app_download": median(app_ratios),
        "load_memory": median(ratios), "load_memory_ratios": ratios,
        "weight_bytes": memory[0]["weight_bytes"], "baseline_rss": median([m["baseline_rss"] for m in memory]),
        "peak_rss": median([m["peak_rss"] for m in memory]), "rss_after": median([m["rss_after"] for m in memory]),
        "load_only_peak_rss": median([m["load_peak_rss"] for m in memory]),
        "load_only_rss": median([m["load_rss"] for m in memory]),
        "load_s": median([m["load_s"] for m in memory]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    write(measure(args.runs), args.json)


if __name__ == "__main__":
    main()
