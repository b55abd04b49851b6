"""Ask where a repo's LFS objects live whether each one exists, downloading none of them.

Standard library only (the hooks use it). The commonest broken upload is pointers
pushed without their objects (a ``git push`` from a machine without git-lfs, an
interrupted upload); the clone then fails only at ``git lfs pull``, after minutes.

A remote over HTTP(S) is asked through the LFS batch API with ``operation:
download``: the answer lists a download action for each object it holds and an
error (404) for each it lacks; nothing is fetched. A ``file://`` remote or a local
repo is looked up in its ``lfs/objects`` folder.
"""

from __future__ import annotations

import json
import re
import socket
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple
from urllib.parse import unquote, urlsplit

from .git_tools import auth_header
from .source import same_host

LFS_JSON = "application/vnd.git-lfs+json"
BATCH_SIZE = 100  # the spec lets servers cap a batch; 100 is what git-lfs itself sends
_OID = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class LFSObject:
    path: str  # the file in the repo that points at it
    oid: str
    size: int


class LFSUnanswered(RuntimeError):
    """The LFS store could not say (unreachable, refused, malformed answer): the objects were not checked."""

    def __init__(self, what: str, kind: str = "network") -> None:
        super().__init__(what)
        self.kind = kind  # network, auth or server


def read_pointers(root: Path, names: Sequence[str]) -> List[LFSObject]:
    """The (oid, size) each named pointer file promises; files that are not pointers are left out."""
    found = []
    for name in names:
        try:
            text = (root / name).read_bytes()[:1024].decode("utf-8", "replace")
        except OSError:
            continue
        oid = re.search(r"^oid sha256:([0-9a-f]{64})$", text, re.MULTILINE)
        size = re.search(r"^size (\d+)$", text, re.MULTILINE)
        if oid and size:
            found.append(LFSObject(name, oid.group(1), int(size.group(1))))
    return found


def lfs_endpoint(git_url: str, lfsconfig: Optional[Path] = None) -> str:
    """The LFS API base git-lfs would use: ``.lfsconfig``'s lfs.url, else ``<repo>.git/info/lfs``."""
    if lfsconfig is not None and lfsconfig.is_file():
        section = ""
        for line in lfsconfig.read_text(encoding="utf-8", errors="replace").splitlines():
            line = line.strip()
            if line.startswith("["):
                section = line.strip("[]").strip().lower()
            elif section == "lfs" and "=" in line:
                key, _, value = line.partition("=")
                value = value.strip().strip('"')  # git config values may be quoted
                if key.strip().lower() == "url" and value:
                    return value.rstrip("/")
    base = git_url.rstrip("/")
    return (base if base.endswith(".git") else base + ".git") + "/info/lfs"


def local_store(git_url: str) -> Optional[Path]:
    """The object folder of a ``file://`` (or plain path) remote: a bare repo's lfs/objects, or .git/lfs/objects."""
    if git_url.startswith("file://"):
        root = Path(unquote(urlsplit(git_url).path))
    elif "://" in git_url or re.match(r"^[\w.-]+@[\w.-]+:", git_url):
        return None
    else:
        root = Path(git_url).expanduser()
    for candidate in (root / "lfs" / "objects", root / ".git" / "lfs" / "objects"):
        if candidate.is_dir():
            return candidate
    return root / "lfs" / "objects"  # holds nothing: every object is missing


def missing_in_store(store: Path, objects: Sequence[LFSObject]) -> List[LFSObject]:
    """Objects absent from a local store, or present with another size (a truncated upload)."""
    missing = []
    for item in objects:
        path = store / item.oid[:2] / item.oid[2:4] / item.oid
        try:
            if path.stat().st_size == item.size:
                continue
        except OSError:
            pass
        missing.append(item)
    return missing


def missing_on_server(endpoint: str, objects: Sequence[LFSObject], token: str = "", user: str = "",
                      timeout: float = 15.0, ref: str = "", repo_url: str = "") -> List[LFSObject]:
    """Objects the server's batch API says it does not hold; LFSUnanswered when it cannot tell."""
    missing: List[LFSObject] = []
    for start in range(0, len(objects), BATCH_SIZE):
        chunk = objects[start:start + BATCH_SIZE]
        answer = _batch(endpoint, chunk, token, user, timeout, ref, repo_url or endpoint)
        known: Dict[str, Mapping[str, object]] = {}
        for entry in answer.get("objects") or []:
            if isinstance(entry, dict) and isinstance(entry.get("oid"), str):
                known[entry["oid"]] = entry
        for item in chunk:
            entry = known.get(item.oid)
            if entry is None or "error" in entry or "download" not in (entry.get("actions") or {}):
                missing.append(item)
    return missing


class _SameHostRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect, but carry the token only to the host it was meant for."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urlsplit(newurl).hostname != urlsplit(req.full_url).hostname:
            new.remove_header("Authorization")
        return new


def _batch(endpoint: str, chunk: Sequence[LFSObject], token: str, user: str, timeout: float,
           ref: str, repo_url: str = "") -> Mapping[str, object]:
    body: Dict[str, object] = {
        "operation": "download",
        "transfers": ["basic"],
        "objects": [{"oid": item.oid, "size": item.size} for item in chunk if _OID.match(item.oid)],
    }
    if ref:
        body["ref"] = {"name": ref}
    headers = {"Accept": LFS_JSON, "Content-Type": LFS_JSON, "User-Agent": "git-lfs/3 (xlab-chat-template check)"}
    if token and same_host(endpoint, repo_url):  # never to another host
        name, _, value = auth_header(token, user).partition(": ")
        headers[name] = value
    request = urllib.request.Request(endpoint + "/objects/batch", data=json.dumps(body).encode(), headers=headers,
                                     method="POST")
    try:
        with urllib.request.build_opener(_SameHostRedirects).open(request, timeout=max(0.5, timeout)) as response:
            raw = response.read(16 * 1024 * 1024)
    except urllib.error.HTTPError as error:
        kind = "auth" if error.code in (401, 403) else "server"
        raise LFSUnanswered(f"the LFS server answered HTTP {error.code} to the batch request", kind) from None
    except (socket.timeout, TimeoutError):
        raise LFSUnanswered(f"the LFS server sent no answer within {timeout:.0f} s") from None
    except (urllib.error.URLError, OSError) as error:
        reason = getattr(error, "reason", error)
        raise LFSUnanswered(f"the LFS server could not be reached ({reason})") from None
    try:
        answer = json.loads(raw)
    except ValueError:
        raise LFSUnanswered("the LFS server's batch answer is not JSON", "server") from None
    if not isinstance(answer, dict):
        raise LFSUnanswered("the LFS server's batch answer is not a JSON object", "server")
    return answer


def check_objects(git_url: str, root: Path, names: Sequence[str], token: str = "", user: str = "",
                  timeout: float = 15.0, ref: str = "") -> Tuple[List[LFSObject], List[LFSObject]]:
    """(all pointed-at objects, the missing ones) for the named pointer files of a checkout at root."""
    objects = read_pointers(root, names)
    if not objects:
        return [], []
    store = local_store(git_url)
    if store is not None:
        return objects, missing_in_store(store, objects)
    if not git_url.startswith(("http://", "https://")):
        raise LFSUnanswered("the remote is not reached over HTTP(S), so its LFS store was not asked", "protocol")
    endpoint = lfs_endpoint(git_url, root / ".lfsconfig")
    return objects, missing_on_server(endpoint, objects, token, user, timeout, ref, git_url)
