"""Run git and git-lfs so that they never hang, never prompt and never leak a token.

Standard library only: the template's hooks import this under cookiecutter's
interpreter, where nothing else is installed.
"""

from __future__ import annotations

import base64
import os
import re
import signal
import subprocess
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

LFS_POINTER_PREFIX = b"version https://git-lfs.github.com/spec/v1"
POINTER_MAX_BYTES = 1024
STALL_SECONDS = 30
# git-lfs retries a stalled object 8 times by default, each after a full stall: 2 keeps a dead host's
# failure within about (1 + LFS_RETRIES) stall bounds, while a short hiccup still resumes (Range request).
LFS_RETRIES = 2
NETWORK_FIX = "check the network or proxy, then start again"
_STALL_SIGNS = ("i/o timeout", "operation too slow", "timed out", "timeout awaiting", "deadline exceeded")


def stall_seconds(env: Optional[Mapping[str, str]] = None) -> int:
    """Seconds without data after which a transfer counts as stalled: MODEL_STALL_SECONDS, else 30."""
    raw = (os.environ if env is None else env).get("MODEL_STALL_SECONDS", "")
    try:
        return max(1, int(raw)) if raw.strip() else STALL_SECONDS
    except ValueError:
        return STALL_SECONDS


class RepoError(RuntimeError):
    """A failure a user can fix: ``what`` went wrong and ``fix`` says how to mend it."""

    def __init__(self, what: str, fix: str, kind: str = "other") -> None:
        super().__init__(f"{what} — {fix}")
        self.what = what
        self.fix = fix
        # auth, revision, not-found, network, disk, missing-tool or other: lets callers decide ✗ from ⚠.
        self.kind = kind


def auth_header(token: str, user: str = "") -> str:
    """The HTTP header that carries the token: git, git-lfs and the LFS batch check all send this one."""
    credentials = base64.b64encode(f"{user or 'oauth2'}:{token}".encode()).decode()
    return f"Authorization: Basic {credentials}"


def git_env(token: str = "", user: str = "", base: Optional[Mapping[str, str]] = None) -> Dict[str, str]:
    """Environment for every git call.

    The token travels only as an ``http.extraHeader`` passed through GIT_CONFIG_*
    variables: never in a URL, an argument list or ``.git/config``, and inherited
    credential helpers are reset so none of them stores it.
    """
    env = dict(os.environ if base is None else base)
    stall = stall_seconds(env)
    env.update(
        GIT_TERMINAL_PROMPT="0",
        GIT_LFS_SKIP_SMUDGE="1",
        GIT_HTTP_LOW_SPEED_LIMIT="1000",
        GIT_HTTP_LOW_SPEED_TIME=str(stall),
        GIT_SSH_COMMAND=env.get("GIT_SSH_COMMAND", "ssh -o BatchMode=yes -o ConnectTimeout=15"),
        GCM_INTERACTIVE="never",
        LC_ALL="C",
    )
    for noisy in ("GIT_TRACE", "GIT_CURL_VERBOSE", "GIT_TRACE_CURL", "GIT_TRACE_PACKET"):
        env.pop(noisy, None)
    config = [("lfs.activitytimeout", str(stall)), ("lfs.dialtimeout", "15"),
              ("lfs.transfer.maxretries", str(LFS_RETRIES)), ("lfs.transfer.maxretrydelay", str(min(stall, 10)))]
    if token:
        config += [("credential.helper", ""), ("http.extraHeader", auth_header(token, user))]
    start = int(env.get("GIT_CONFIG_COUNT") or 0)
    for index, (key, value) in enumerate(config, start):
        env[f"GIT_CONFIG_KEY_{index}"] = key
        env[f"GIT_CONFIG_VALUE_{index}"] = value
    env["GIT_CONFIG_COUNT"] = str(start + len(config))
    return env


def redact(text: str, secrets: Sequence[str]) -> str:
    """Blank out secrets and any credentials embedded in URLs before text is shown."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return re.sub(r"(https?://)[^/@\s]+@", r"\1***@", text)


def explain_failure(step: str, stderr: str, stall: int = STALL_SECONDS) -> RepoError:
    """Turn git's stderr into a message that says what failed and what to do."""
    lower = stderr.lower()
    detail = stderr.strip().splitlines()[-1] if stderr.strip() else "no output"
    stalled = [line for line in stderr.splitlines() if any(sign in line.lower() for sign in _STALL_SIGNS)]
    if "could not read username" in lower or "authentication failed" in lower or " 401" in lower or " 403" in lower:
        return RepoError(
            f"{step}: the model repo needs a login",
            "set MODEL_REPO_TOKEN to an access token (and MODEL_REPO_USER to your user name on OpenXLab)",
            "auth",
        )
    if "permission denied (publickey" in lower:
        return RepoError(f"{step}: the SSH server refused the key", "add your SSH key to the model hub, or use the"
                         " https URL with MODEL_REPO_TOKEN", "auth")
    if any(s in lower for s in ("couldn't find remote ref", "not our ref", "unknown revision", "did not match any")):
        fix = "check MODEL_REVISION: a branch, tag or commit of the model repo"
        return RepoError(f"{step}: revision not found ({detail})", fix, "revision")
    if stalled:
        return RepoError(
            f"{step}: timed out — the model host sent no data for {stall} s ({stalled[-1].strip()[-160:]})",
            f"{NETWORK_FIX}; the download resumes where it stopped (MODEL_STALL_SECONDS sets the bound)",
            "network",
        )
    network = ("could not resolve host", "connection refused", "timed out", "timeout", "could not resolve hostname",
               "network is unreachable", "no route to host", "connection reset", "empty reply from server",
               "operation too slow", "failed to connect", "couldn't connect", "connection closed by remote host")
    if any(s in lower for s in network):
        return RepoError(f"{step}: cannot reach the model host ({detail})", NETWORK_FIX, "network")
    if "not found" in lower or "does not appear to be a git repository" in lower or " 404" in lower:
        fix = "check MODEL_REPO: copy the git URL from the model page"
        return RepoError(f"{step}: model repo not found ({detail})", fix, "not-found")
    if "no space left" in lower:
        return RepoError(f"{step}: the disk is full", "free space or set MODEL_DIR to a larger disk", "disk")
    return RepoError(f"{step} failed ({detail})", "fix MODEL_REPO or the network as git says, then retry")


def _kill(process: "subprocess.Popen[str]") -> None:
    """End git and every helper it started, then reap it."""
    try:
        if os.name == "posix":
            os.killpg(process.pid, signal.SIGKILL)
        else:
            process.kill()
    except OSError:
        pass
    process.wait()
    for pipe in (process.stdout, process.stderr):
        if pipe is not None:
            pipe.close()


def run_git(
    args: List[str],
    step: str,
    env: Mapping[str, str],
    cwd: Optional[Path] = None,
    timeout: Optional[float] = None,
    secrets: Sequence[str] = (),
    on_start: Optional[Callable[[int], None]] = None,
) -> str:
    """Run one git command; raise RepoError with a clear message on any failure.

    ``on_start`` gets the process group id (posix), so a later start can end the
    helpers of a git that outlived its app (kill -9 ends the app, not its children).
    """
    # Own process group, so a timeout also ends git's helpers (git-remote-https, ssh, git-lfs).
    group = {"start_new_session": True} if os.name == "posix" else {}
    try:
        process = subprocess.Popen(
            ["git", *args],
            cwd=cwd,
            env=dict(env),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
            **group,
        )
    except FileNotFoundError:
        raise RepoError("git is not installed", "install git (on Debian/Ubuntu: apt-get install git)",
                        "missing-tool") from None
    try:
        if on_start is not None:
            on_start(process.pid)
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill(process)
        raise RepoError(f"{step}: no answer within {timeout:.0f} s", NETWORK_FIX, "network") from None
    except BaseException:
        _kill(process)
        raise
    done = subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
    if done.returncode != 0:
        error = explain_failure(step, redact(done.stderr, secrets), stall_seconds(env))
        raise error
    return done.stdout


def require_git_lfs(env: Mapping[str, str]) -> None:
    """Fail early and clearly where git-lfs is missing, instead of loading pointer files later."""
    try:
        run_git(["lfs", "version"], "git lfs", env, timeout=30)
    except RepoError:
        raise RepoError(
            "git-lfs is not installed, so only pointer files would be downloaded",
            "install git-lfs (packages.txt lists it for the platforms; locally: apt-get install git-lfs"
            " or brew install git-lfs)",
            "missing-tool",
        ) from None


def read_pointer(path: Path) -> Optional[int]:
    """Return the size an LFS pointer file promises, or None when the file is real content."""
    try:
        if path.stat().st_size >= POINTER_MAX_BYTES:
            return None
        head = path.read_bytes()
    except OSError:
        return None
    if not head.startswith(LFS_POINTER_PREFIX):
        return None
    match = re.search(rb"^size (\d+)$", head, re.MULTILINE)
    return int(match.group(1)) if match else None


def working_files(root: Path) -> List[Path]:
    """Every file of a checkout, .git excluded, as paths relative to root."""
    files = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = [d for d in dirs if d != ".git"]
        files += [Path(folder, name).relative_to(root) for name in names]
    return sorted(files)
