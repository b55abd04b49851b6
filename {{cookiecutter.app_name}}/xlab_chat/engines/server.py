"""Launch an engine's own OpenAI-compatible server on the downloaded model and chat through it.

ENGINE=lmdeploy runs ``lmdeploy serve api_server`` (TurboMind: 4-bit AWQ models, continuous batching),
ENGINE=vllm runs ``vllm serve``, ENGINE=llamacpp ``python -m llama_cpp.server`` on a GGUF made from the model
(engines/llamacpp.py); ENGINE_COMMAND runs any other server that speaks the same API (e.g.
``transformers serve {model} --port {port}``). Each starts on a free loopback port under the guard
(engines/guard.py), so it dies with the page; ENGINE_ARGS adds flags. Standard library only.

Flags as documented by each engine (checked 2026-11): LMDeploy 0.18 ``--server-name``, ``--server-port``,
``--backend turbomind``, ``--model-format awq``; vLLM 0.33 ``--host``, ``--port``, ``--quantization awq``,
``--trust-remote-code`` (its InternLM2 model is built in, but the repos' config and tokenizer are custom code).
Both serve ``/health`` and name the model by the path they were given.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, List, Optional

from . import llamacpp
from .openai_api import Endpoint, EndpointError, OpenAIEngine, wait_until_serving
from .process import APP_FOLDER, SECRETS, LoadSpec, StatusSink, describe_exit, no_restart

HOST = "127.0.0.1"
# Sampling fields per preset (see OpenAIEngine.extra). llama.cpp's server would add its own defaults
# (repeat_penalty 1.1, top_k 40, min_p 0.05) to the app's; these are the app's penalty and transformers'
# defaults (top_k 50, no min_p). top_k 0 (no limit) is not used: sorting all 92544 ids each token cost
# llama.cpp several times its decode speed here (2.2-2.5 against 4.5-13.4 tok/s with top_k 1, 1.8B Q4_K_M).
SAMPLING = {"llamacpp": {"repetition_penalty": "repeat_penalty", "top_k": 50, "min_p": 0.0}}
NAMES = {"lmdeploy": "LMDeploy", "vllm": "vLLM", "llamacpp": "llama.cpp", "command": "the engine server"}
INSTALL_FIX = ("install it with `pip install -r requirements.txt` on Linux x86_64 with an NVIDIA GPU (CUDA); on a"
               " CPU use ENGINE=transformers")


def split(command: str) -> List[str]:
    """Shell-style words; on Windows backslashes are path separators, not escapes."""
    return [part.strip('"') for part in shlex.split(command, posix=False)] if os.name == "nt" else shlex.split(command)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def quant_method(folder: Path) -> str:
    """The checkpoint's quantisation ("awq", "gptq", …) from config.json, or ""."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return ""
    method = (config.get("quantization_config") or {}).get("quant_method", "")
    return str(method).lower()


def executable(name: str) -> str:
    """The engine's command from this Python's environment first (a venv's bin), else PATH."""
    beside = Path(sys.executable).with_name(name)
    if beside.exists():
        return str(beside)
    found = shutil.which(name)
    if found is None:
        raise EndpointError(f"the {NAMES.get(name, name)} command `{name}` is not installed", INSTALL_FIX)
    return found


def command_line(engine: str, folder: Path, port: int, engine_args: str = "", engine_command: str = "",
                 quantize: str = "auto", progress: Callable[[str], None] = lambda stage: None) -> List[str]:
    """The server's argv: a preset for lmdeploy/vllm/llamacpp (which first makes the GGUF, see engines/llamacpp.py),
    or ENGINE_COMMAND with {model}, {port} and {host} filled."""
    awq = quant_method(folder) == "awq"
    if engine_command:
        try:
            argv = [part.format(model=str(folder), port=port, host=HOST) for part in split(engine_command)]
        except (ValueError, KeyError, IndexError) as error:
            raise EndpointError(f"ENGINE_COMMAND cannot be read ({error})",
                                "write it as a command line with {model} and {port}, e.g. "
                                "transformers serve {model} --host {host} --port {port}") from None
    elif engine == "lmdeploy":
        argv = [executable("lmdeploy"), "serve", "api_server", str(folder), "--server-name", HOST, "--server-port",
                str(port), "--backend", "turbomind"] + (["--model-format", "awq"] if awq else [])
    elif engine == "vllm":
        argv = [executable("vllm"), "serve", str(folder), "--host", HOST, "--port", str(port),
                "--trust-remote-code"] + (["--quantization", "awq"] if awq else [])
    elif engine == "llamacpp":
        argv = llamacpp.server_argv(folder, port, HOST, quantize, _child_env(), progress)
    else:
        raise EndpointError(f"ENGINE={engine} does not launch a server", "use lmdeploy, vllm, llamacpp or"
                            " ENGINE_COMMAND")
    return argv + split(engine_args)


class ServerEngine:
    """Runs the server and hands chats to it; restarts it once if it dies, as the engine process does."""

    def __init__(self, status: StatusSink, engine: str, engine_args: str = "", engine_command: str = "",
                 start_timeout: float = 900.0, timeout: float = 60.0) -> None:
        self.status, self.engine = status, engine
        self.engine_args, self.engine_command = engine_args, engine_command
        self.start_timeout, self.timeout = start_timeout, timeout
        self.name = NAMES["command" if engine_command else engine]
        self.server: Optional["subprocess.Popen[bytes]"] = None
        self.client: Optional[OpenAIEngine] = None
        self.spec: Optional[LoadSpec] = None
        self.crashes: List[float] = []
        self.ready, self.ready_since = False, 0.0
        self.closed = False
        self.label = ""

    @property
    def active(self) -> int:
        return self.client.active if self.client else 0

    def chat(self, *args: object) -> object:
        return self.client.chat(*args)

    def load(self, spec: LoadSpec) -> None:
        self.spec = spec
        threading.Thread(target=self._start, name="engine-server", daemon=True).start()

    def close(self) -> None:
        self.closed = True
        if self.server is not None and self.server.stdin is not None:
            self.server.stdin.close()  # the guard ends the server's whole process group

    def _start(self) -> None:
        folder = Path(self.spec.folder)
        try:
            port = free_port()
            argv = command_line(self.engine, folder, port, self.engine_args, self.engine_command,
                                self.spec.quantize, lambda stage: self.status.progress(stage, 0, 0))
            print(f"[engine] starting {self.name}: {shlex.join(redacted(argv))}", flush=True)
            self.server = subprocess.Popen([sys.executable, "-m", "xlab_chat.engines.guard", *argv],
                                           stdin=subprocess.PIPE, cwd=str(APP_FOLDER),
                                           env=_child_env())
            endpoint = Endpoint(f"http://{HOST}:{port}/v1", str(folder), "", self.timeout)
            server = self.server
            wait_until_serving(endpoint, lambda: server.poll() is None, time.monotonic() + self.start_timeout)
        except EndpointError as error:
            self.close()
            self.status.engine_failed(f"{self.name} could not start: {error}")
            return
        except Exception as error:  # a bug, not a user mistake: the page still shows a failure
            self.close()
            self.status.engine_failed(f"{self.name} could not start ({type(error).__name__}: {error}) — see the log")
            return
        self.label = f"{self.name} · {llamacpp.describe(argv) or folder.name}"
        self.client = OpenAIEngine(endpoint, self.label, None if self.engine_command else SAMPLING.get(
            self.engine, {"repetition_penalty": "repetition_penalty"}), on_lost=lambda: self._wait_dead(server))
        self.ready, self.ready_since = True, time.monotonic()
        threading.Thread(target=self._watch, args=(server,), name="engine-watch", daemon=True).start()
        self.status.engine_ready(self)

    @staticmethod
    def _wait_dead(server: "subprocess.Popen[bytes]") -> bool:
        try:
            server.wait(2)
        except subprocess.TimeoutExpired:
            return False
        return True

    def _watch(self, server: "subprocess.Popen[bytes]") -> None:
        code = server.wait()
        if self.closed:
            return
        why = describe_exit(code)
        print(f"[engine] {self.name} ended: {why}", flush=True)
        refusal = no_restart(self.crashes, self.ready, self.name, why, self.ready_since)
        self.ready = False
        if refusal:
            self.status.engine_failed(refusal)
            return
        self.status.engine_restarting(why)
        self._start()


def redacted(argv: List[str]) -> List[str]:
    """The command line as logged: the value after any flag that names a key, token or secret is hidden."""
    shown, hide = [], False
    for part in argv:
        flag, sep, _ = part.partition("=")
        secret = any(word in flag.lower() for word in ("key", "token", "secret", "password"))
        shown.append("***" if hide else (f"{flag}=***" if secret and sep else part))
        hide = secret and part.startswith("-") and not sep
    return shown


def _child_env() -> dict:
    env = {key: value for key, value in os.environ.items() if key not in SECRETS}  # a launched server needs none
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(APP_FOLDER), env.get("PYTHONPATH")]))
    return env

