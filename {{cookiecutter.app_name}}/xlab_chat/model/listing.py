"""List a model repo's files and sizes without its LFS content: a shallow, smudge-skipped checkout.

Sizes of LFS files come from their pointers, so a 15 GB model is listed in seconds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Optional, Sequence, Set, Tuple

from .git_tools import RepoError, read_pointer, run_git, working_files
from .report import Deadline


@dataclass
class Listing:
    """The repo's files without their LFS content: path -> size (promised by the pointer, or real)."""

    root: Path
    sizes: Dict[str, int]
    lfs: Set[str]
    commit: str = ""
    local_folder: bool = False

    def has(self, name: str) -> bool:
        return name in self.sizes

    def read_json(self, name: str) -> Tuple[Optional[dict], str]:
        """(data, "") or (None, why it cannot be read)."""
        if name not in self.sizes:
            return None, f"{name} is missing"
        if name in self.lfs:
            return None, f"{name} is stored in LFS (it cannot be read without downloading)"
        try:
            data = json.loads((self.root / name).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return None, f"{name} is not valid JSON ({error})"
        if not isinstance(data, dict):
            return None, f"{name} does not hold a JSON object"
        return data, ""


def scan_folder(root: Path) -> Tuple[Dict[str, int], Set[str]]:
    sizes, lfs = {}, set()
    for relative in working_files(root):
        path = root / relative
        promised = read_pointer(path)
        name = relative.as_posix()
        if promised is not None:
            sizes[name] = promised
            lfs.add(name)
        else:
            try:
                sizes[name] = path.stat().st_size
            except OSError:
                continue
    return sizes, lfs


_HEX = re.compile(r"^[0-9a-fA-F]{7,40}$")


def list_remote(url: str, revision: str, work: Path, env: Dict[str, str], deadline: Deadline,
                secrets: Sequence[str] = ()) -> Listing:
    """Shallow, smudge-skipped checkout of one revision into work (LFS files stay pointers)."""
    revision = revision or "HEAD"
    run_git(["init", "-q", str(work)], "git init", env, timeout=deadline.left(20))
    run_git(["remote", "add", "origin", url], "git remote add", env, cwd=work, timeout=deadline.left(20))
    fetch = ["fetch", "-q", "--no-tags", "--depth", "1", "origin", revision]
    try:
        run_git(fetch, "git fetch", env, cwd=work, timeout=deadline.left(), secrets=secrets)
        target = "FETCH_HEAD"
    except RepoError as error:
        if error.kind != "revision" or not _HEX.match(revision):
            raise
        # Servers that refuse a commit by hash: fetch the history (still no LFS content) and look it up.
        run_git(["fetch", "-q", "--no-tags", "origin"], "git fetch", env, cwd=work, timeout=deadline.left(),
                secrets=secrets)
        try:
            target = run_git(["rev-parse", "--verify", "-q", revision + "^" + "{commit}"], "git rev-parse", env,
                             cwd=work, timeout=deadline.left(20)).strip()
        except RepoError:
            raise RepoError(f"git fetch: revision not found ({revision})",
                            "check MODEL_REVISION: a branch, tag or commit of the model repo", "revision") from None
    run_git(["checkout", "-q", target], "git checkout", env, cwd=work, timeout=deadline.left(30))
    commit = run_git(["rev-parse", "HEAD"], "git rev-parse", env, cwd=work, timeout=deadline.left(20)).strip()
    sizes, lfs = scan_folder(work)
    return Listing(work, sizes, lfs, commit)
