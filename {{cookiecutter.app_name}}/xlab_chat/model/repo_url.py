"""Turn what people paste as "the model repo" into a git URL git can clone.

Standard library only: the template's hooks use it under cookiecutter's
interpreter, and the app and ``python -m xlab_chat check`` use it too.

Accepted: git URLs (https, http, ssh, scp-like ``git@host:owner/repo.git``,
git://, file://), absolute local folders, and the web pages of the three hubs,
which are rewritten to their git URLs:

* OpenXLab    https://openxlab.org.cn/models/detail/OWNER/REPO -> https://code.openxlab.org.cn/OWNER/REPO.git
* Hugging Face https://huggingface.co/OWNER/REPO[/tree/REV|/blob/REV/...] (also hf.co) -> https://huggingface.co/OWNER/REPO
* ModelScope  https://modelscope.cn/models/OWNER/REPO[/files|/summary] -> https://www.modelscope.cn/OWNER/REPO.git
  (both ModelScope git forms, www.modelscope.cn/OWNER/REPO.git and modelscope.cn/models/OWNER/REPO.git, are kept)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional
from urllib.parse import parse_qs, unquote, urlsplit

OPENXLAB, HUGGINGFACE, MODELSCOPE, OTHER, LOCAL = "openxlab", "huggingface", "modelscope", "other", "local"
REPO_FIX = ("answer a git URL (https://…, ssh://…, git@host:owner/repo.git, file://…), a model page URL"
            " or an absolute folder")

_SCP_LIKE = re.compile(r"^[A-Za-z0-9._-]+@[A-Za-z0-9.-]+:(?!//)\S+$")
_SCHEMES = ("https", "http", "ssh", "git", "file")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_HF_HOSTS = ("huggingface.co", "www.huggingface.co", "hf.co")
_MS_HOSTS = ("modelscope.cn", "www.modelscope.cn")
_OX_HOSTS = ("openxlab.org.cn", "www.openxlab.org.cn")
_OX_GIT_HOST = "code.openxlab.org.cn"
_HOST_PREFIXES = _HF_HOSTS + _MS_HOSTS + _OX_HOSTS + (_OX_GIT_HOST,)


class RepoURLError(ValueError):
    """The answer is not something git can clone; ``what`` and ``fix`` say why and how to mend it."""

    def __init__(self, what: str, fix: str = REPO_FIX) -> None:
        super().__init__(f"{what} — {fix}")
        self.what = what
        self.fix = fix


@dataclass(frozen=True)
class RepoURL:
    """A normalised model repo: where git clones it from and what the page is."""

    original: str
    git_url: str  # what git clones (a local folder stays a plain path)
    hub: str  # openxlab, huggingface, modelscope, other or local
    revision: Optional[str] = None  # implied by the address (/tree/<rev>), else None
    web_url: str = ""  # the model's page on its hub, "" when there is none

    @property
    def changed(self) -> bool:
        return self.git_url != self.original or self.revision is not None

    def describe(self) -> str:
        """One line saying what the pasted address was turned into."""
        text = f"model_repo {self.original} is a web page; using its git URL {self.git_url}"
        if self.revision:
            text += f" at revision {self.revision}"
        return text


def _segments(path: str) -> List[str]:
    return [unquote(part) for part in path.split("/") if part]


def _check_names(hub: str, owner: str, name: str, original: str) -> None:
    for part in (owner, name):
        if not _NAME.match(part):
            raise RepoURLError(f"model_repo {original} does not name a {hub} model (got {part!r})",
                               f"copy the address of the model's page on {hub}")


def _strip_git(name: str) -> str:
    return name[:-4] if name.endswith(".git") else name


def _revision_after(parts: List[str], markers: tuple) -> Optional[str]:
    """The segment after /tree/, /blob/ or /resolve/ (a branch, tag or commit)."""
    for index, part in enumerate(parts):
        if part in markers and index + 1 < len(parts):
            return parts[index + 1]
    return None


def _huggingface(original: str, parts: List[str]) -> RepoURL:
    if parts and parts[0] in ("datasets", "spaces"):
        raise RepoURLError(f"model_repo {original} is a Hugging Face {parts[0][:-1]}, not a model",
                           "use the address of a model: https://huggingface.co/OWNER/REPO")
    if parts and parts[0] == "models":
        parts = parts[1:]
    if not parts:
        raise RepoURLError(f"model_repo {original} names no model", "use https://huggingface.co/OWNER/REPO")
    # Models without an owner (https://huggingface.co/gpt2) still exist.
    if len(parts) == 1 or parts[1] in ("tree", "blob", "resolve", "commit", "discussions", "files"):
        repo = [_strip_git(parts[0])]
        rest = parts[1:]
    else:
        repo = [parts[0], _strip_git(parts[1])]
        rest = parts[2:]
    _check_names("Hugging Face", repo[0], repo[-1], original)
    base = "https://huggingface.co/" + "/".join(repo)
    revision = _revision_after(rest[:2], ("tree", "blob", "resolve", "commit"))
    git_url = original if original in (base, base + ".git") else base
    return RepoURL(original, git_url, HUGGINGFACE, revision, base)


def _modelscope(original: str, url: str, parts: List[str], query: str) -> RepoURL:
    if parts and parts[0] == "datasets":
        raise RepoURLError(f"model_repo {original} is a ModelScope dataset, not a model",
                           "use the address of a model: https://modelscope.cn/models/OWNER/REPO")
    if parts and parts[0] == "models":
        if len(parts) < 3:
            raise RepoURLError(f"model_repo {original} names no model", "use https://modelscope.cn/models/OWNER/REPO")
        owner, name, rest = parts[1], parts[2], parts[3:]
        is_git = name.endswith(".git") and not rest  # current SDK form: modelscope.cn/models/OWNER/REPO.git
    elif len(parts) >= 2:
        owner, name, rest = parts[0], parts[1], parts[2:]
        is_git = not rest  # older form: www.modelscope.cn/OWNER/REPO.git
    else:
        raise RepoURLError(f"model_repo {original} names no model", "use https://modelscope.cn/models/OWNER/REPO")
    name = _strip_git(name)
    _check_names("ModelScope", owner, name, original)
    web = f"https://modelscope.cn/models/{owner}/{name}"
    revision = _revision_after(rest[:2], ("tree", "blob", "file"))
    revisions = parse_qs(query).get("Revision") or parse_qs(query).get("revision")
    if revisions and revisions[0] not in ("", "master"):
        revision = revisions[0]
    if is_git:
        return RepoURL(original, url, MODELSCOPE, None, web)
    return RepoURL(original, f"https://www.modelscope.cn/{owner}/{name}.git", MODELSCOPE, revision, web)


def _openxlab(original: str, url: str, host: str, parts: List[str]) -> RepoURL:
    if host == _OX_GIT_HOST:
        if len(parts) != 2:
            raise RepoURLError(f"model_repo {original} is not an OpenXLab git URL",
                               "use https://code.openxlab.org.cn/OWNER/REPO.git")
        owner, name = parts[0], _strip_git(parts[1])
        _check_names("OpenXLab", owner, name, original)
        return RepoURL(original, url, OPENXLAB, None, f"https://openxlab.org.cn/models/detail/{owner}/{name}")
    if len(parts) < 4 or parts[:2] != ["models", "detail"]:
        raise RepoURLError(f"model_repo {original} is not an OpenXLab model page",
                           "use https://openxlab.org.cn/models/detail/OWNER/REPO or its git URL"
                           " https://code.openxlab.org.cn/OWNER/REPO.git")
    owner, name = parts[2], parts[3]
    _check_names("OpenXLab", owner, name, original)
    revision = _revision_after(parts[4:6], ("tree", "blob"))
    return RepoURL(original, f"https://code.openxlab.org.cn/{owner}/{name}.git", OPENXLAB, revision,
                   f"https://openxlab.org.cn/models/detail/{owner}/{name}")


def hub_of(url: str) -> str:
    """openxlab, huggingface, modelscope, other or local, from the address alone."""
    try:
        return normalise(url).hub
    except RepoURLError:
        return OTHER


def normalise(text: str) -> RepoURL:
    """Validate a model repo answer and rewrite hub web pages to git URLs; raise RepoURLError."""
    original = str(text).strip()
    if not original:
        raise RepoURLError("model_repo is empty")
    if original.startswith("-") or any(ch.isspace() or ord(ch) < 32 for ch in original):
        raise RepoURLError(f"model_repo {original!r} is not a URL or a folder (it starts with '-' or holds spaces)")
    lowered = original.lower()
    if "://" not in original and lowered.split("/")[0] in _HOST_PREFIXES:
        return _normalise_url(original, "https://" + original)  # pasted without https://
    if "://" not in original:
        if _SCP_LIKE.match(original):
            return RepoURL(original, original, OTHER)
        path = Path(original).expanduser()
        if not path.is_absolute():
            raise RepoURLError(
                f"model_repo {original} is neither a URL nor an absolute folder",
                "use the full address (e.g. https://huggingface.co/OWNER/REPO) or an absolute path to a folder",
            )
        return RepoURL(original, original, LOCAL)
    return _normalise_url(original, original)


def _normalise_url(original: str, url: str) -> RepoURL:
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError on a malformed port
    except ValueError:
        raise RepoURLError(f"model_repo {original} is not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in _SCHEMES:
        raise RepoURLError(f"model_repo {original} uses {scheme}://, which git cannot clone here")
    if parts.password or (parts.username and scheme in ("https", "http")):
        raise RepoURLError(
            f"model_repo has a user name or token inside the URL ({scheme}://…@{parts.hostname})",
            "remove it from the URL and set MODEL_REPO_TOKEN (and MODEL_REPO_USER) in the environment instead",
        )
    if scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise RepoURLError(f"model_repo {original} is not a local file:// URL", "use file:///absolute/path")
        return RepoURL(original, original, LOCAL)
    host = (parts.hostname or "").lower()
    if not host:
        raise RepoURLError(f"model_repo {original} has no host name")
    segments = _segments(parts.path)
    if scheme in ("https", "http") and port is None:
        if host in _HF_HOSTS:
            return _huggingface(original, segments)
        if host in _MS_HOSTS:
            return _modelscope(original, url, segments, parts.query)
        if host in _OX_HOSTS or host == _OX_GIT_HOST:
            return _openxlab(original, url, host, segments)
    return RepoURL(original, url, OTHER)
