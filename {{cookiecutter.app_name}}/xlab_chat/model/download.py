"""Get the model onto this machine once, completely, and prove it before anyone loads it.

Standard library only, so it runs before any requirement is installed.

The clone goes to a folder beside MODEL_DIR and is renamed into place only after
every LFS file is verified; the next start verifies the local copy and never
touches the network.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple
from urllib.parse import urlsplit

from .git_tools import RepoError, git_env, read_pointer, require_git_lfs, run_git, working_files
from .llava_layout import is_llava_folder
from .loader_files import loader_files
from .source import ModelSource

MARKER = "xlab-model.json"
LIST_TIMEOUT = 300

Progress = Callable[[str, int, int], None]  # (stage, bytes done, bytes total)


def _no_progress(stage: str, done: int, total: int) -> None:
    return None


def verify_checkout(folder: Path, expected_sizes: Optional[Dict[str, int]] = None) -> None:
    """Refuse a folder that still holds LFS pointer files or files of the wrong size."""
    if not any((folder / name).is_file() for name in ("config.json", "adapter_config.json")) and \
            not is_llava_folder(folder):
        raise RepoError(f"{folder} has no config.json (nor adapter_config.json, nor an XTuner LLaVA projector/)",
                        "point MODEL_REPO or MODEL_PATH at a complete model folder, a LoRA adapter or an XTuner"
                        " LLaVA folder")
    for relative in working_files(folder):
        promised = read_pointer(folder / relative)
        if promised is not None:
            raise RepoError(
                f"{relative} in {folder} is a git-lfs pointer, not the real file",
                "install git-lfs and run `git lfs pull` in that folder (the app re-downloads MODEL_DIR by itself)",
            )
    for relative, size in (expected_sizes or {}).items():
        path = folder / relative
        actual = path.stat().st_size if path.is_file() else -1
        if actual != size:
            raise RepoError(
                f"{relative} has {max(actual, 0)} bytes, its LFS pointer says {size}",
                "the download is incomplete; delete the model folder and start again",
            )


def read_marker(folder: Path) -> Optional[dict]:
    try:
        return json.loads((folder / ".git" / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_marker(folder: Path, record: dict) -> None:
    """Write atomically, so a crash never leaves a marker that vouches for half a model."""
    target = folder / ".git" / MARKER
    partial = target.with_suffix(".tmp")
    partial.write_text(json.dumps(record, indent=2), encoding="utf-8")
    os.replace(partial, target)


def local_copy_is_good(folder: Path, source: ModelSource) -> bool:
    """True when folder holds a verified download of exactly this source and revision."""
    marker = read_marker(folder)
    if not marker or marker.get("url") != source.url or marker.get("revision") != source.revision:
        return False
    try:
        verify_checkout(folder, marker.get("lfs_sizes"))
    except (RepoError, OSError) as error:
        print(f"[model] local copy rejected: {error}; downloading again", flush=True)
        return False
    return True


def _end_orphaned_git(groups: List[int]) -> None:
    """End the git/git-lfs process groups a killed app left running, so they stop writing into the work folder.

    A group counts only while one of its members still runs git (a reused id of another program is left alone).
    """
    proc = Path("/proc")
    if os.name != "posix" or not proc.is_dir():
        return
    for stat in proc.glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            name = stat.with_name("comm").read_text().strip()
            if int(fields[2]) in groups and name.startswith("git"):
                os.killpg(int(fields[2]), 9)


class DirectoryLock:
    """An exclusive-create lock file: works on every OS and every filesystem git works on.

    The first line is the holder's pid; ``record`` adds the process group of each git it
    starts, so whoever takes over from a killed holder can end that holder's git first.
    """

    def __init__(self, path: Path, on_wait: Callable[[], None]) -> None:
        self.path = path
        self.on_wait = on_wait
        self.handle: Optional[int] = None

    def record(self, group: int) -> None:
        if self.handle is not None:
            os.write(self.handle, f"{group}\n".encode())

    def _holder_is_gone(self) -> bool:
        if os.name == "nt":
            try:  # Windows refuses to delete a file its holder still has open.
                self.path.unlink()
                return True
            except OSError:
                return False
        try:
            numbers = [int(word) for word in self.path.read_text().split()]
            os.kill(numbers[0], 0)
        except ProcessLookupError:
            _end_orphaned_git(numbers[1:])
            return True
        except (OSError, ValueError, IndexError):
            return False
        return False

    def __enter__(self) -> "DirectoryLock":
        announced = False
        while True:
            try:
                self.handle = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                os.write(self.handle, f"{os.getpid()}\n".encode())
                return self
            except FileExistsError:
                if self._holder_is_gone():
                    self.path.unlink(missing_ok=True)
                    continue
                if not announced:
                    print(f"[model] another process is downloading into this folder; waiting ({self.path})", flush=True)
                    announced = True
                self.on_wait()
                time.sleep(1)

    def __exit__(self, *exc: object) -> None:
        if self.handle is not None:
            os.close(self.handle)
        with contextlib.suppress(OSError):
            self.path.unlink()


def _folder_bytes(folder: Path) -> int:
    total = 0
    for root, _dirs, names in os.walk(folder):
        for name in names:
            with contextlib.suppress(OSError):
                total += os.stat(os.path.join(root, name)).st_size
    return total


def _watch_transfer(lfs_dir: Path, total: int, progress: Progress, done: threading.Event) -> None:
    """Report bytes fetched by git-lfs by watching its object store; git-lfs itself only shows a TTY bar."""
    last_print = 0.0
    while not done.wait(1.0):
        fetched = min(_folder_bytes(lfs_dir), total)
        progress("downloading", fetched, total)
        if time.monotonic() - last_print > 10:
            percent = 100 * fetched // total if total else 100
            print(f"[model] downloading: {fetched / 1e6:,.1f} / {total / 1e6:,.1f} MB ({percent}%)", flush=True)
            last_print = time.monotonic()


def _check_disk(folder: Path, lfs_bytes: int) -> None:
    """The LFS store and the working copy coexist until the pull is verified: twice the bytes."""
    needed = 2 * lfs_bytes
    free = shutil.disk_usage(folder).free
    floor = int(os.environ.get("MODEL_MIN_FREE_BYTES", "0") or 0)
    if free - needed < floor:
        raise RepoError(
            f"not enough disk: the model needs {needed / 1e9:.2f} GB while downloading, {free / 1e9:.2f} GB are free",
            "free space or set MODEL_DIR to a folder on a larger disk",
        )


def clone_without_weights(source: ModelSource, work: Path, env: Dict[str, str],
                          secrets: tuple = ()) -> None:
    """Shallow checkout of one revision into a new folder, LFS files left as pointers (GIT_LFS_SKIP_SMUDGE)."""
    run_git(["init", "-q", str(work)], "git init", env, timeout=60)
    run_git(["lfs", "install", "--local"], "git lfs install", env, cwd=work, timeout=60)
    run_git(["remote", "add", "origin", source.url], "git remote add", env, cwd=work, timeout=60)
    try:
        run_git(["fetch", "-q", "--depth", "1", "origin", source.revision], "git fetch", env, cwd=work,
                timeout=LIST_TIMEOUT, secrets=secrets)
    except RepoError as error:
        if "revision not found" not in error.what:
            raise
        # Some servers refuse to hand out a commit by its hash: fetch history and look it up.
        run_git(["fetch", "-q", "origin"], "git fetch", env, cwd=work, timeout=LIST_TIMEOUT, secrets=secrets)
        run_git(["checkout", "-q", source.revision], "git checkout", env, cwd=work, timeout=LIST_TIMEOUT)
        return
    run_git(["checkout", "-q", "FETCH_HEAD"], "git checkout", env, cwd=work, timeout=LIST_TIMEOUT)


def lfs_sizes(work: Path) -> Dict[str, int]:
    """Sizes promised by the pointer files of a smudge-skipped checkout."""
    sizes = {}
    for relative in working_files(work):
        size = read_pointer(work / relative)
        if size is not None:
            sizes[relative.as_posix()] = size
    return sizes


def _salvage_lfs(work: Path, keep: Path) -> None:
    """Move what an earlier attempt fetched out of its work folder, then drop the folder.

    Objects in ``.git/lfs/objects`` were checked by git-lfs before they got there; a
    partial file resumes with a Range request and is checked when complete.
    """
    lfs = work / ".git" / "lfs"
    if lfs.is_dir() and any(lfs.rglob("*")):
        shutil.rmtree(keep, ignore_errors=True)
        os.replace(lfs, keep)
    shutil.rmtree(work, ignore_errors=True)


def _restore_lfs(keep: Path, work: Path) -> int:
    """Put salvaged LFS data into a fresh clone; return the bytes that need no new download.

    A pull that failed on the network leaves ``incomplete/<oid>.part``; one killed by a
    signal leaves ``incomplete/<oid><random digits>``, which git-lfs would never resume,
    so the biggest such file per object becomes its ``.part``.
    """
    if not keep.is_dir():
        return 0
    lfs = work / ".git" / "lfs"
    reused = 0
    for stored in sorted((keep / "objects").rglob("*")) if (keep / "objects").is_dir() else []:
        if stored.is_file():
            destination = lfs / stored.relative_to(keep)
            destination.parent.mkdir(parents=True, exist_ok=True)
            reused += stored.stat().st_size
            os.replace(stored, destination)
    partial: Dict[str, Path] = {}
    for piece in (keep / "incomplete").iterdir() if (keep / "incomplete").is_dir() else []:
        oid = piece.name[:64]
        named = len(oid) == 64 and all(c in "0123456789abcdef" for c in oid) and piece.is_file()
        if named and (oid not in partial or piece.stat().st_size > partial[oid].stat().st_size):
            partial[oid] = piece
    if partial:
        (lfs / "incomplete").mkdir(parents=True, exist_ok=True)
    for oid, piece in partial.items():
        reused += piece.stat().st_size
        os.replace(piece, lfs / "incomplete" / f"{oid}.part")
    shutil.rmtree(keep, ignore_errors=True)
    return reused


def download(source: ModelSource, target: Path, token: str = "", user: str = "", keep_lfs_cache: bool = False,
             progress: Progress = _no_progress, on_git_start: Optional[Callable[[int], None]] = None) -> None:
    """Clone beside target, pull LFS, verify, then rename into place.

    Only the LFS bytes of an attempt that failed on the network (or was killed) are kept,
    in ``.NAME.partial`` beside target, so the next start resumes instead of starting over.
    """
    env = git_env(token, user)
    require_git_lfs(env)
    work = target.parent / f".{target.name}.download"
    keep = target.parent / f".{target.name}.partial"
    _salvage_lfs(work, keep)  # a killed earlier attempt
    try:
        commit, sizes = _clone_verified(source, work, env, (token,), progress, keep, on_git_start)
        if not keep_lfs_cache:
            shutil.rmtree(work / ".git" / "lfs" / "objects", ignore_errors=True)
        write_marker(work, {"url": source.url, "revision": source.revision, "commit": commit, "lfs_sizes": sizes})
        if target.exists():
            stale = target.parent / f".{target.name}.old-{os.getpid()}"
            os.replace(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
        os.replace(work, target)
    except RepoError as error:
        if error.kind == "network":
            _salvage_lfs(work, keep)
        else:
            shutil.rmtree(work, ignore_errors=True)
            shutil.rmtree(keep, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    total = sum(sizes.values())
    print(f"[model] ready: {target} at {commit[:12]} ({total / 1e6:,.1f} MB verified)", flush=True)


def _only_what_loads(work: Path, sizes: Dict[str, int]) -> Dict[str, int]:
    """Keep the LFS files the loaders read (loader_files); the others' pointer files leave the checkout."""
    wanted = set(loader_files(sorted(sizes)))
    for name in sorted(set(sizes) - wanted):
        (work / name).unlink()
        print(f"[model] skipping {name} (the app does not read it)", flush=True)
    return {name: size for name, size in sizes.items() if name in wanted}


def _clone_verified(source: ModelSource, work: Path, env: Dict[str, str], secrets: tuple, progress: Progress,
                    keep: Path, on_git_start: Optional[Callable[[int], None]]) -> Tuple[str, Dict[str, int]]:
    progress("checking", 0, 0)
    if source.url.startswith("file://") and not Path(urlsplit(source.url).path).exists():
        raise RepoError(f"model repo {source.url} does not exist", "check MODEL_REPO: the folder must exist")
    clone_without_weights(source, work, env, secrets)
    sizes = _only_what_loads(work, lfs_sizes(work))
    total = sum(sizes.values())
    _check_disk(work.parent, total)
    reused = _restore_lfs(keep, work)
    resumed = f", resuming with {reused / 1e6:,.1f} MB already here" if reused else ""
    print(f"[model] downloading {total / 1e6:,.1f} MB ({len(sizes)} files in LFS){resumed}", flush=True)
    finished = threading.Event()
    watcher = threading.Thread(target=_watch_transfer, args=(work / ".git" / "lfs", total, progress, finished),
                               daemon=True)
    watcher.start()
    try:
        only = ["--include", ",".join(sorted(sizes))] if sizes else []  # the files kept, and no others
        run_git(["lfs", "pull", "origin", *only], "git lfs pull", env, cwd=work, secrets=secrets,
                on_start=on_git_start)
    finally:
        finished.set()
        watcher.join()
    progress("verifying", total, total)
    verify_checkout(work, sizes)
    commit = run_git(["rev-parse", "HEAD"], "git rev-parse", env, cwd=work, timeout=60).strip()
    return commit, sizes


def ensure_model(source: ModelSource, model_dir: Path, token: str = "", user: str = "",
                 keep_lfs_cache: bool = False, progress: Progress = _no_progress) -> Path:
    """Return a verified local model folder, downloading only when no good copy exists."""
    if source.local_folder is not None:
        progress("checking", 0, 0)
        verify_checkout(source.local_folder)
        return source.local_folder
    model_dir.parent.mkdir(parents=True, exist_ok=True)
    if local_copy_is_good(model_dir, source):
        print(f"[model] using the verified local copy in {model_dir} (no download)", flush=True)
        return model_dir
    lock_path = model_dir.parent / f".{model_dir.name}.lock"
    with DirectoryLock(lock_path, on_wait=lambda: progress("waiting", 0, 0)) as lock:
        if not local_copy_is_good(model_dir, source):  # another process may have finished meanwhile
            download(source, model_dir, token, user, keep_lfs_cache, progress, lock.record)
    return model_dir
