"""The token never leaks, and no code from the model repo runs with the default native loader.

One real app downloads an InternLM2 repo (whose modeling/configuration files write a marker
when imported) from a token-protected, throttled loopback host, serves a chat, and a second
app fails a download with the same token.
"""

from __future__ import annotations

import base64
import os
import time
import urllib.request
from pathlib import Path

import faultkit
import internlm2_fixture
import psutil
import pytest
from apprunner import AppProcess, render, stream_chat
from faultkit import FaultHost, publish_with_blob

pytestmark = pytest.mark.e2e
USER, TOKEN = "alice", "tok-9f8e7d6c5b4a-secret"
SHORT = {"system_prompt": "", "max_new_tokens": 4, "temperature": 0.0, "top_p": 0.8, "repetition_penalty": 1.0}
FORMS = [TOKEN, base64.b64encode(f"{USER}:{TOKEN}".encode()).decode(),
         base64.b64encode(f"oauth2:{TOKEN}".encode()).decode()]


def leaks_in(text: str) -> list:
    return [form for form in FORMS if form in text]


def files_with_secret(folder: Path) -> list:
    found = []
    for root, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(root, name)
            if path.is_file() and not path.is_symlink():
                data = path.read_bytes()
                if any(form.encode() in data for form in FORMS):
                    found.append(str(path))
    return found


def test_token_leaks_nowhere_and_native_loader_runs_no_repo_code(tmp_path: Path):
    marker = tmp_path / "REPO-CODE-RAN"
    model = internlm2_fixture.build_internlm2(tmp_path / "internlm2")
    for module in ("modeling_internlm2.py", "configuration_internlm2.py"):
        path = model / module
        path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n" + path.read_text())
    bare = publish_with_blob(model, tmp_path / "srv", name="secret.git", blob_bytes=3_000_000)
    app_dir = render(tmp_path / "out", model_repo="https://example.invalid/unused.git", hardware="cpu",
                     ui_language="en", validate_model_repo=False)
    model_dir = tmp_path / "weights" / "model"
    env = {"MODEL_REPO_TOKEN": TOKEN, "MODEL_REPO_USER": USER, "MODEL_DIR": str(model_dir), "KEEP_LFS_CACHE": "1"}
    with FaultHost(bare.parent, USER, TOKEN, rate=1_000_000) as host:
        app = AppProcess(app_dir, {**env, "MODEL_REPO": host.url("secret.git")}, tmp_path / "app.log")
        failed = None
        try:
            command_lines, git_seen = [], False
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline and not (model_dir / "config.json").exists():
                for process in psutil.process_iter(["cmdline"]):
                    line = " ".join(process.info.get("cmdline") or [])
                    command_lines.append(line)
                    git_seen = git_seen or ("git" in line and "lfs" in line and "pull" in line)
                time.sleep(0.1)
            assert git_seen, "the pull was never seen running: nothing was sampled"
            assert leaks_in("\n".join(command_lines)) == []
            app.wait_stage(("ready",), timeout=180)
            assert stream_chat(app.url, "hello", **SHORT)[-1]
            pages = "".join(urllib.request.urlopen(app.url + path, timeout=30).read().decode("utf-8", "replace")
                            for path in ("/", "/config"))
            assert leaks_in(pages) == []
            failed = AppProcess(app_dir, {**env, "MODEL_DIR": str(tmp_path / "other" / "model"),
                                          "MODEL_REPO": host.url("missing.git")}, tmp_path / "failed.log")
            state = failed.wait_stage(("failed",), timeout=120)
            assert leaks_in(state["error"]) == []
            assert any(ok for _method, _path, _sent, ok in host.requests)  # the token was really used
        finally:
            app.stop()
            if failed is not None:
                failed.stop()
    assert leaks_in(app.log) == [] and leaks_in(failed.log) == []
    assert (model_dir / ".git" / "lfs" / "objects").is_dir()  # KEEP_LFS_CACHE=1: the store is scanned too
    assert files_with_secret(app_dir) == [] and files_with_secret(tmp_path / "weights") == []
    assert files_with_secret(tmp_path / "other") == []
    assert "extraheader" not in (model_dir / ".git" / "config").read_text().lower()
    assert not marker.exists(), "the default native loader imported code from the model repo"
    assert faultkit.tree_bytes(model_dir) > 3_000_000
