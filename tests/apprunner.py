"""Render the template and run the generated app as a real server process."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from cookiecutter.main import cookiecutter

ROOT = Path(__file__).resolve().parents[1]


def render(output_dir: Path, **context: object) -> Path:
    """Render the template with --no-input and the given answers; return the app folder."""
    answers = {key: value for key, value in context.items()}
    folder = cookiecutter(str(ROOT), no_input=True, output_dir=str(output_dir), extra_context=answers)
    return Path(folder)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class AppProcess:
    """``python app.py`` in a rendered folder, with its log captured to a file."""

    def __init__(self, folder: Path, env: dict, log: Path, python: str = sys.executable) -> None:
        self.folder = folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        full_env = {**os.environ, "GRADIO_SERVER_PORT": str(self.port), "PYTHONUNBUFFERED": "1", **env}
        self.log_file = open(log, "w", encoding="utf-8")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen([python, "app.py"], cwd=folder, env=full_env, stdout=self.log_file,
                                        stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    @property
    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def status(self) -> dict:
        """The app's /status API, through gradio's plain HTTP endpoint."""
        from gradio_client import Client

        return Client(self.url, verbose=False).predict(api_name="/status")

    def wait_serving(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"app exited with {self.process.returncode}:\n{self.log}")
            try:
                urllib.request.urlopen(self.url + "/config", timeout=2).read()
                return
            except OSError:
                time.sleep(0.5)
        raise AssertionError(f"app did not serve within {timeout} s:\n{self.log}")

    def wait_stage(self, stages: tuple = ("ready",), timeout: float = 180) -> dict:
        self.wait_serving(timeout)
        deadline = time.monotonic() + timeout
        state: dict = {}
        while time.monotonic() < deadline:
            state = self.status()
            if state["stage"] in stages:
                return state
            if state["stage"] == "failed":
                break
            time.sleep(0.5)
        raise AssertionError(f"stage {state} is not one of {stages}:\n{self.log}")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()


def stream_chat(url: str, message: str, **params: object) -> list:
    """Every update the /chat endpoint streams for one message."""
    from gradio_client import Client

    job = Client(url, verbose=False).submit(message, *params.values(), api_name="/chat") if params else \
        Client(url, verbose=False).submit(message, api_name="/chat")
    updates = [text for text in job]
    final = job.result()
    return updates + ([final] if not updates or updates[-1] != final else [])


def dump(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, indent=1)
