"""Check 6: the weights are in LFS, and the LFS store really holds their content (asked without downloading)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Tuple

from .lfs_objects import LFSUnanswered, check_objects
from .listing import Listing
from .report import FAIL, LATER, MAX_TIMEOUT, OK, SKIP, TOKEN_FIX, WARN, Check, Deadline, human_bytes

PLAIN_BLOB_LIMIT = 10 * 1024 * 1024  # hubs want anything larger in LFS


@dataclass(frozen=True)
class Remote:
    """How to reach the repo's LFS store: the git URL and the same credentials the clone sends."""

    url: str
    token: str = field(default="", repr=False)
    user: str = ""


def _missing_objects(listing: Listing, remote: Remote, deadline: Deadline) -> Tuple[Optional[Check], str]:
    """(a ✗ naming the files whose LFS objects the store lacks or a ⚠ when it could not say, else None;
    what was asked, for the ✓ line)."""
    title = "6 weights in LFS"
    names = sorted(listing.lfs)
    try:
        objects, missing = check_objects(remote.url, listing.root, names, remote.token, remote.user,
                                         timeout=deadline.left(cap=20))
    except LFSUnanswered as error:
        if error.kind == "protocol":
            return None, "objects not asked: an ssh remote"
        fix = TOKEN_FIX if error.kind == "auth" and not remote.token else LATER
        return Check(title, WARN, f"{len(names)} file(s) in LFS, but whether their content was uploaded is not"
                     f" known: {error}", fix), ""
    if not missing:
        where = "the LFS server" if remote.url.startswith(("http://", "https://")) else "the remote's LFS store"
        return None, f"all {len(objects)} object(s) present on {where}"
    shown = ", ".join(item.path for item in missing[:4]) + (" …" if len(missing) > 4 else "")
    return Check(title, FAIL, f"{len(missing)} of {len(objects)} LFS object(s) are not on the server, only their"
                 f" pointers: {shown}",
                 "the pointers were pushed without the files (git-lfs missing or the upload interrupted): from the"
                 " machine that has the files, run `git lfs push --all origin`, then check again"), ""


def check_lfs(listing: Listing, weights: List[str], remote: Optional[Remote] = None,
               deadline: Optional[Deadline] = None) -> Check:
    title = "6 weights in LFS"
    if listing.local_folder:
        pointers = sorted(listing.lfs)
        if pointers:
            return Check(title, FAIL, f"{', '.join(pointers[:3])} are LFS pointer files, not the real files",
                         "run `git lfs pull` in that folder")
        return Check(title, OK, "local folder: the files are used as they are")
    plain = [w for w in weights if w not in listing.lfs]
    plain += [n for n, size in listing.sizes.items() if n not in listing.lfs and size > PLAIN_BLOB_LIMIT
              and n not in plain]
    fix = ("track them with git lfs (`git lfs track \"*.safetensors\"`, or `git lfs migrate import"
           " --include=\"*.safetensors,*.bin\"` for committed history) and push again")
    absent, asked = None, ""
    if remote is not None and listing.lfs:
        absent, asked = _missing_objects(listing, remote, deadline or Deadline(MAX_TIMEOUT))
    if absent is not None and absent.status == FAIL:
        return absent
    if plain:
        return Check(title, WARN, f"committed as plain git blobs, not LFS: {', '.join(sorted(plain)[:4])}", fix)
    if absent is not None:
        return absent
    if not weights:
        return Check(title, SKIP, "not checked (no weights)")
    stored = sum(listing.sizes[w] for w in weights)
    asked = f"; {asked}" if asked else ""
    return Check(title, OK, f"{len(weights)} file(s) in LFS ({human_bytes(stored)}, not downloaded){asked}")
