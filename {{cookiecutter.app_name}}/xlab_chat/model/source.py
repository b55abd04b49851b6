"""Where the model comes from: a hub's git URL (web pages turned into one), or a folder used in place.

Standard library only (the hooks use it through the repo check).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .repo_url import LOCAL, OTHER, RepoURLError, normalise


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a git remote, or a folder used as it is."""

    url: str
    revision: str
    local_folder: Optional[Path] = None


def resolve_source(repo: str, revision: str) -> ModelSource:
    """A local folder holding config.json is used in place; anything else is a git remote.

    A hub's web page (Hugging Face, ModelScope, OpenXLab) becomes its git URL, and a
    /tree/<rev> address sets the revision unless another one than "main" was asked for.
    """
    try:
        parsed = normalise(repo)
    except RepoURLError:
        parsed = None
    if parsed is not None and parsed.changed and parsed.hub not in (LOCAL, OTHER):
        repo = parsed.git_url
        if parsed.revision and revision in ("", "main"):
            revision = parsed.revision
    candidate = Path(repo).expanduser()
    if "://" not in repo and candidate.exists():
        if (candidate / "config.json").is_file():
            return ModelSource(url="", revision=revision, local_folder=candidate.resolve())
        return ModelSource(url=candidate.resolve().as_uri(), revision=revision)
    return ModelSource(url=repo, revision=revision)


def same_host(first: str, second: str) -> bool:
    """Whether two repo addresses are on one host: a token for one is never sent to another."""
    from urllib.parse import urlsplit

    def host(url: str) -> str:
        if "://" not in url:  # scp-like user@host:path, or a local path
            return url.split("@", 1)[-1].split(":", 1)[0] if "@" in url else ""
        return (urlsplit(url).hostname or "").lower()

    return bool(host(first)) and host(first) == host(second)
