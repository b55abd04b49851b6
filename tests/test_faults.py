"""Faults during the download, on real app processes against a slow or stalling loopback LFS host.

A killed download, two starts at once, a full disk and a stalled host: each start ends
with a verified model (or a clear error), never loads a partial one and leaves no temp folders.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import faultkit
import pytest
from apprunner import AppProcess, render, stream_chat
from faultkit import BLOB, FaultHost, lfs_oid, processes_in, publish_with_blob, wait_for

pytestmark = pytest.mark.e2e
USER, TOKEN = "alice", "fault-token-3141"
SHORT = {"system_prompt": "", "max_new_tokens": 4, "temperature": 0.0, "top_p": 0.8, "repetition_penalty": 1.0}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict:
    base = tmp_path_factory.mktemp("faults")
    model = faultkit.quick_model(base / "model")
    bare = publish_with_blob(model, base / "srv")
    app = render(base / "out", model_repo="https://example.invalid/unused.git", hardware="cpu", ui_language="en",
                 validate_model_repo=False)
    blob = (bare.parent / "model-with-blob" / BLOB).read_bytes()
    return {"base": base, "bare": bare, "app": app, "blob": blob, "blob_oid": lfs_oid(bare, BLOB)}


def app_env(host: FaultHost, model_dir: Path, **extra: str) -> dict:
    return {"MODEL_REPO": host.url("big.git"), "MODEL_DIR": str(model_dir), "MODEL_REPO_TOKEN": TOKEN,
            "MODEL_REPO_USER": USER, **extra}


def leftovers(model_dir: Path) -> list:
    return sorted(p.name for p in model_dir.parent.iterdir() if p.name != model_dir.name)


def git_processes_under(folder: Path) -> list:
    return [cmd for cmd in processes_in(folder) if "git" in cmd]


def test_download_killed_halfway_resumes_and_never_loads_a_partial(world: dict, tmp_path: Path):
    model_dir = tmp_path / "weights" / "model"
    work = model_dir.parent / ".model.download"
    with FaultHost(world["bare"].parent, USER, TOKEN, rate=400_000) as host:
        first = AppProcess(world["app"], app_env(host, model_dir), tmp_path / "killed.log")
        try:
            incomplete = work / ".git" / "lfs" / "incomplete"

            def blob_partial() -> int:
                return sum(p.stat().st_size for p in incomplete.glob(world["blob_oid"] + "*"))

            wait_for(lambda: blob_partial() > 1_000_000, 120, what="1 MB of the blob on disk")
            assert git_processes_under(work), "git lfs pull should be running when the app is killed"
            host.cut_off()  # the download in flight gets no more bytes, whoever holds it
            os.kill(first.process.pid, signal.SIGKILL)
            first.process.wait(10)
        finally:
            first.stop()
        assert not model_dir.exists(), "nothing may be renamed into place before verification"
        fetched = blob_partial()
        host.reset_counts()
        host.configure(rate=None)
        second = AppProcess(world["app"], app_env(host, model_dir), tmp_path / "restart.log")
        try:
            second.wait_stage(("ready",), timeout=180)
            assert "resuming with" in second.log
            blob_starts = [start for start in host.ranges if start > 0]
            assert blob_starts and min(blob_starts) >= 1_000_000, (host.ranges, fetched)
            assert host.object_gets.get(world["blob_oid"]) == 1
            assert (model_dir / BLOB).read_bytes() == world["blob"]
            assert not (model_dir / ".git" / "lfs").exists() or not (model_dir / ".git" / "lfs" / "objects").exists()
            assert leftovers(model_dir) == [], leftovers(model_dir)
            assert git_processes_under(work) == [] and git_processes_under(model_dir) == []
            assert stream_chat(second.url, "hi", **SHORT)[-1]
        finally:
            second.stop()


def test_two_starts_at_once_download_once_and_share_the_copy(world: dict, tmp_path: Path):
    model_dir = tmp_path / "weights" / "model"
    with FaultHost(world["bare"].parent, USER, TOKEN, rate=2_000_000) as host:
        apps = [AppProcess(world["app"], app_env(host, model_dir), tmp_path / f"twin{i}.log") for i in (1, 2)]
        try:
            for app in apps:
                app.wait_stage(("ready",), timeout=180)
            logs = [app.log for app in apps]
            assert sum("files in LFS" in log for log in logs) == 1, logs  # the one that downloads says so
            assert sum("another process is downloading" in log for log in logs) == 1, logs
            assert host.batches == 3  # each app's pre-flight check asks once (object GETs: none), git-lfs once
            assert set(host.object_gets.values()) == {1} and len(host.object_gets) == 3, host.object_gets
            assert (model_dir / BLOB).read_bytes() == world["blob"]
            assert leftovers(model_dir) == []
            for app in apps:
                assert stream_chat(app.url, "hi", **SHORT)[-1]
        finally:
            for app in apps:
                app.stop()


def test_not_enough_disk_fails_the_start_with_both_numbers(world: dict, tmp_path: Path):
    model_dir = tmp_path / "weights" / "model"
    with FaultHost(world["bare"].parent, USER, TOKEN) as host:
        app = AppProcess(world["app"], app_env(host, model_dir, MODEL_MIN_FREE_BYTES=str(10**15)),
                         tmp_path / "disk.log")
        try:
            state = app.wait_stage(("failed",), timeout=120)
            assert "not enough disk" in state["error"]
            assert "needs 0.01 GB while downloading" in state["error"] and "GB are free" in state["error"]
            assert host.object_gets == {}  # refused before any weight was fetched
            assert "could not start" in stream_chat(app.url, "hello")[-1]
            assert not model_dir.exists() and leftovers(model_dir) == []
        finally:
            app.stop()


def test_stalled_host_fails_within_the_bound_then_a_retry_resumes(world: dict, tmp_path: Path):
    model_dir = tmp_path / "weights" / "model"
    with FaultHost(world["bare"].parent, USER, TOKEN, rate=4_000_000, stall_after=1_500_000) as host:
        env = app_env(host, model_dir, MODEL_STALL_SECONDS="2")
        app = AppProcess(world["app"], env, tmp_path / "stall.log")
        try:
            app.wait_serving()
            wait_for(host.server.stalled.is_set, 60, what="the host to stall")
            stalled_at = time.monotonic()
            state = app.wait_stage(("failed",), timeout=60)
            waited = time.monotonic() - stalled_at
            assert "timed out" in state["error"] and "no data for 2 s" in state["error"], state["error"]
            assert waited < 20, f"the stall was noticed only after {waited:.0f} s"
            assert not model_dir.exists()
        finally:
            app.stop()
        host.configure()  # the host recovers
        host.reset_counts()
        keep_env = {**env, "KEEP_LFS_CACHE": "1"}
        retry = AppProcess(world["app"], keep_env, tmp_path / "retry.log")
        try:
            retry.wait_stage(("ready",), timeout=180)
            assert min(host.ranges) >= 1_000_000, host.ranges  # resumed, not started over
            assert (model_dir / BLOB).read_bytes() == world["blob"]
            store = model_dir / ".git" / "lfs" / "objects"
            assert faultkit.tree_bytes(store) >= len(world["blob"])  # KEEP_LFS_CACHE=1 keeps the LFS store
            assert leftovers(model_dir) == []
        finally:
            retry.stop()
