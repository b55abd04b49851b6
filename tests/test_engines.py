"""The OpenAI-compatible engines on real servers: `transformers serve` runs here on the CPU.

It is the external server for engine=openai (behind a loopback proxy that enforces an API key and injects
faults) and the child the launcher starts through ENGINE_COMMAND, the same start / wait / stream / cancel /
restart code the lmdeploy and vllm presets use. Those presets need an NVIDIA GPU; here they are checked as
command lines.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import tinymodel
from apprunner import AppProcess, free_port, render
from faultkit import wait_for
from openai_proxy import OpenAIProxy

pytestmark = pytest.mark.e2e
KEY = "sk-engine-test-5e3b1d7a9c"
GREEDY = ("", 64, 0.0, 0.8, 1.0)
TRANSFORMERS = str(Path(sys.executable).with_name("transformers"))


@pytest.fixture(scope="module")
def chat_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained chat model with generation_config stopping on eos and <|im_end|>, as InternLM2 repos do."""
    folder = tmp_path_factory.mktemp("served") / "model"
    shutil.copytree(tiny_model, folder)
    im_end = json.loads((folder / "tokenizer.json").read_text())["model"]["vocab"].get("<|im_end|>")
    generation = json.loads((folder / "generation_config.json").read_text())
    generation["eos_token_id"] = [2, im_end]
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def served(chat_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """`transformers serve` on the chat model: a real OpenAI-compatible server on loopback."""
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "serve.log", "w")  # noqa: SIM115 - closed below
    server = subprocess.Popen([TRANSFORMERS, "serve", str(chat_model), "--host", "127.0.0.1", "--port", str(port),
                               "--device", "cpu"], stdout=log, stderr=subprocess.STDOUT)
    import urllib.request

    def healthy() -> bool:
        try:
            return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for(healthy, 180, interval=0.5, what="transformers serve")
        yield port
    finally:
        server.terminate()
        server.wait(20)
        log.close()


def openai_app(tmp_path: Path, url: str, model: str, **env: str) -> AppProcess:
    folder = render(tmp_path / "out", engine="openai", engine_url=url, engine_model=model, ui_language="en",
                    validate_model_repo=False)
    return AppProcess(folder, env, tmp_path / "app.log")


def chat(url: str, message: str, params: tuple = GREEDY, client=None) -> str:
    from gradio_client import Client

    return (client or Client(url, verbose=False)).predict(message, *params, api_name="/chat")


def test_openai_engine_chats_and_sends_the_whole_history(served, chat_model, tmp_path):
    from gradio_client import Client

    with OpenAIProxy(served, KEY) as proxy:
        app = openai_app(tmp_path, proxy.url, str(chat_model), ENGINE_API_KEY=KEY)
        try:
            state = app.wait_stage(("ready",))
            assert state["device"] == f"{chat_model} @ {proxy.url.split('//')[1].split('/')[0]}"
            client = Client(app.url, verbose=False)
            assert chat(app.url, tinymodel.GREETING, client=client) == tinymodel.GREETING_REPLY
            second = chat(app.url, "讲个故事", ("You are kind.", 16, 0.0, 0.8, 1.0), client=client)
            assert second
            sent = proxy.server.chats[-1]
            assert [m["role"] for m in sent["messages"]] == ["system", "user", "assistant", "user"]
            assert sent["messages"][1:3] == [{"role": "user", "content": tinymodel.GREETING},
                                             {"role": "assistant", "content": tinymodel.GREETING_REPLY}]
            assert sent["temperature"] == 0.0 and sent["max_tokens"] == 16 and sent["stream"] is True
            assert all(auth == f"Bearer {KEY}" for auth in proxy.server.seen_auth)
        finally:
            app.stop()
    assert_key_absent(app, tmp_path)


def assert_key_absent(app: AppProcess, tmp_path: Path) -> None:
    assert KEY not in app.log
    for path in app.folder.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
    for process in psutil.process_iter(["cmdline"]):
        assert KEY not in " ".join(process.info["cmdline"] or []), process


@pytest.mark.parametrize("fault", ["429", "stall", "malformed", "cut"])
def test_faults_mid_chat_give_a_clear_message_and_the_page_keeps_serving(served, chat_model, tmp_path, fault):
    with OpenAIProxy(served, KEY) as proxy:
        app = openai_app(tmp_path, proxy.url, str(chat_model), ENGINE_API_KEY=KEY, ENGINE_TIMEOUT="3")
        try:
            app.wait_stage(("ready",))
            setattr(proxy.server, {"429": "status_429", "stall": "stall", "malformed": "malformed",
                                   "cut": "cut_after"}[fault], 3 if fault == "cut" else True)
            start = time.monotonic()
            reply = chat(app.url, tinymodel.GREETING)
            took = time.monotonic() - start
            print(f"[{fault}] {took:.1f} s: {reply!r}")
            expected = {"429": "busy or over its rate limit", "stall": "sent nothing for 3 s",
                        "malformed": tinymodel.GREETING_REPLY, "cut": "lost the engine server"}[fault]
            assert expected in reply
            if fault == "malformed":
                assert reply == tinymodel.GREETING_REPLY and "skipped a malformed event" in app.log
            for name in ("status_429", "stall", "malformed"):
                setattr(proxy.server, name, False)
            proxy.server.cut_after = 0
            proxy.server.stalled.set()
            assert chat(app.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY  # the page kept serving
        finally:
            app.stop()


@pytest.mark.parametrize("case", ["down", "wrong-key", "unlisted"])
def test_start_faults_fail_on_the_page_with_the_fix(served, chat_model, tmp_path, case):
    with OpenAIProxy(served, KEY) as proxy:
        proxy.server.models = ["someone-elses-model"] if case == "unlisted" else [str(chat_model)]
        url = {"down": f"http://127.0.0.1:{free_port()}/v1"}.get(case, proxy.url)
        key = "sk-wrong" if case == "wrong-key" else KEY
        app = openai_app(tmp_path, url, str(chat_model), ENGINE_API_KEY=key)
        try:
            app.wait_serving()
            wait_for(lambda: app.status()["stage"] == "failed", 30, what="the failure")
            error = app.status()["error"]
            expected = {"down": ("cannot reach the engine server", "check ENGINE_URL"),
                        "wrong-key": ("refused the API key (HTTP 401)", "ENGINE_API_KEY"),
                        "unlisted": ("does not list the model", "someone-elses-model")}[case]
            assert all(part in error for part in expected), error
            assert key not in error and "Traceback" not in app.log
        finally:
            app.stop()


def serve_children(app: AppProcess) -> list:
    return [p for p in psutil.Process(app.process.pid).children(recursive=True)
            if "serve" in " ".join(p.cmdline()) and "guard" not in " ".join(p.cmdline())]


def test_launcher_runs_an_engine_server_and_restarts_it_after_a_crash(chat_model, tmp_path):
    remote = tinymodel.publish(chat_model, tmp_path / "remote.git")
    folder = render(tmp_path / "out", model_repo=remote, hardware="cpu", ui_language="en", validate_model_repo=False)
    command = f"{TRANSFORMERS} serve {{model}} --host {{host}} --port {{port}} --device cpu"
    app = AppProcess(folder, {"MODEL_DIR": str(tmp_path / "weights"), "ENGINE_COMMAND": command,
                              "ENGINE_START_TIMEOUT": "240"}, tmp_path / "app.log")
    from gradio_client import Client

    try:
        app.wait_serving()
        stages = []
        wait_for(lambda: stages.append(app.status()["stage"]) or stages[-1] in ("ready", "failed"), 240,
                 interval=0.2, what="ready")
        assert stages[-1] == "ready", app.log
        assert "[engine] starting the engine server: " in app.log  # the page said "Starting the engine server…"
        assert app.status()["device"].startswith("the engine server")
        assert chat(app.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY
        server = serve_children(app)
        assert len(server) == 1
        job = Client(app.url, verbose=False).submit(tinymodel.STORY, "", 3000, 0.0, 0.8, 1.0, api_name="/chat")
        wait_for(lambda: len(job.outputs()) >= 3, 60, interval=0.05, what="a streaming reply")
        os.kill(server[0].pid, signal.SIGKILL)
        reply = job.result(timeout=60)
        assert "The model process stopped before this reply was finished" in reply, reply
        wait_for(lambda: app.status()["stage"] == "ready", 240, interval=0.2, what="ready again")
        assert chat(app.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY
    finally:
        app.stop()
    wait_for(lambda: not [p for p in psutil.process_iter(["cmdline"])
                          if str(tmp_path) in " ".join(p.info["cmdline"] or [])], 10, what="no server left")


def test_stop_closes_the_stream_which_aborts_it_on_the_server(served, chat_model, tmp_path):
    from gradio_client import Client

    with OpenAIProxy(served, KEY) as proxy:
        app = openai_app(tmp_path, proxy.url, str(chat_model), ENGINE_API_KEY=KEY)
        try:
            app.wait_stage(("ready",))
            job = Client(app.url, verbose=False).submit(tinymodel.STORY, "", 3000, 0.0, 0.8, 1.0, api_name="/chat")
            wait_for(lambda: len(job.outputs()) >= 3, 60, interval=0.05, what="a streaming reply")
            job.cancel()
            wait_for(lambda: proxy.server.client_hangups >= 1, 10, what="the stream to be closed")
            wait_for(lambda: app.status()["generating"] == 0, 10, what="the slot to be free")
        finally:
            app.stop()


def test_gpu_engine_presets_as_command_lines(app_modules, tmp_path, monkeypatch):
    """lmdeploy and vllm need an NVIDIA GPU, so they are not installed here: their executables are stand-ins
    (named so) and only the command lines are checked. A GPU machine runs them for real (see the closing note)."""
    from xlab_chat.engines import server

    monkeypatch.setattr(server, "executable", lambda name: f"/stand-in/{name}")
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": {"quant_method": "awq", "w_bit": 4}}))
    assert server.command_line("lmdeploy", folder, 23333, "--tp 2 --session-len 8192") == [
        "/stand-in/lmdeploy", "serve", "api_server", str(folder), "--server-name", "127.0.0.1", "--server-port",
        "23333", "--backend", "turbomind", "--model-format", "awq", "--tp", "2", "--session-len", "8192"]
    assert server.command_line("vllm", folder, 8000) == [
        "/stand-in/vllm", "serve", str(folder), "--host", "127.0.0.1", "--port", "8000", "--trust-remote-code",
        "--quantization", "awq"]
    (folder / "config.json").write_text("{}")
    assert "--model-format" not in server.command_line("lmdeploy", folder, 1)


def test_missing_engine_fails_with_the_install_fix(app_modules, tmp_path):
    from xlab_chat.engines import server
    from xlab_chat.engines.openai_api import EndpointError

    with pytest.raises(EndpointError, match="not installed") as caught:
        server.command_line("lmdeploy", tmp_path, 1)
    assert "Linux x86_64" in caught.value.fix


def test_the_check_knows_gpu_engines_and_4bit_repos(app_modules, tiny_model, tmp_path):
    from xlab_chat.model import check

    folder = tmp_path / "awq"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "w_bit": 4, "q_group_size": 128}
    (folder / "config.json").write_text(json.dumps(config))
    url = tinymodel.publish(folder, tmp_path / "awq.git")
    lines = {engine: {c.title.split()[0]: c for c in check.check_repo(url, "main", hardware, engine=engine).checks}
             for engine, hardware in (("transformers", "a10-24gb"), ("lmdeploy", "cpu"), ("vllm", "a10-24gb"))}
    assert lines["transformers"]["9"].status == "fail"
    assert "a 4-bit AWQ model" in lines["transformers"]["9"].detail
    assert "engine=lmdeploy (or vllm) on a GPU" in lines["transformers"]["9"].fix
    assert lines["lmdeploy"]["9"].status == "fail" and "hardware a10-24gb" in lines["lmdeploy"]["9"].fix
    assert lines["vllm"]["9"].status == "ok" and "4-bit AWQ model for vLLM" in lines["vllm"]["9"].detail
    assert "quantized: counted as stored" in lines["vllm"]["7"].detail


def test_the_hook_refuses_a_gpu_engine_on_the_cpu(tmp_path, capfd):
    from cookiecutter.exceptions import FailedHookException

    with pytest.raises(FailedHookException):
        render(tmp_path / "out", engine="lmdeploy", hardware="cpu", validate_model_repo=False)
    assert "engine=lmdeploy needs an NVIDIA GPU but hardware is cpu" in capfd.readouterr().err


def test_the_hook_checks_the_endpoint_for_engine_openai(served, chat_model, tmp_path, capfd, monkeypatch):
    with OpenAIProxy(served, KEY) as proxy:
        proxy.server.models = [str(chat_model)]
        monkeypatch.setenv("ENGINE_API_KEY", KEY)
        render(tmp_path / "ok", engine="openai", engine_url=proxy.url, engine_model=str(chat_model))
        out = capfd.readouterr().out
        assert "✓ 2 API key accepted" in out and "✓ 3 model served" in out, out
        monkeypatch.setenv("ENGINE_API_KEY", "sk-wrong")
        from cookiecutter.exceptions import FailedHookException

        with pytest.raises(FailedHookException):
            render(tmp_path / "bad", engine="openai", engine_url=proxy.url, engine_model=str(chat_model))
        captured = capfd.readouterr()
        assert "✗ 2 API key accepted" in captured.out and "sk-wrong" not in captured.out + captured.err


def test_logged_command_lines_hide_keys_and_tokens(app_modules):
    from xlab_chat.engines.server import redacted

    argv = ["vllm", "serve", "/m", "--api-key", "sk-1", "--hf-token=hf_2", "--port", "8000"]
    assert redacted(argv) == ["vllm", "serve", "/m", "--api-key", "***", "--hf-token=***", "--port", "8000"]


def test_engine_url_and_key_mistakes_are_refused_clearly(app_modules):
    from xlab_chat.engines.openai_api import Endpoint, EndpointError

    with pytest.raises(EndpointError, match="port is not a number"):
        Endpoint.from_url("http://user:pw@host:port/v1", "m")
    with pytest.raises(EndpointError, match="characters an HTTP header cannot carry") as caught:
        Endpoint.from_url("http://host:8000/v1", "m", "sk-abc\ndef")
    assert "sk-abc" not in str(caught.value)
    endpoint = Endpoint.from_url("https://user:pw@host:8443/v1/chat/completions?x=1", "m", " sk-key \n")
    assert endpoint.api_key == "sk-key" and endpoint.shown == "https://host:8443"


def test_the_token_goes_to_its_own_host_only(app_modules):
    from xlab_chat.model.source import same_host

    assert same_host("https://huggingface.co/me/adapter", "https://huggingface.co/internlm/internlm2-chat-1_8b")
    assert not same_host("https://huggingface.co/me/adapter", "https://code.openxlab.org.cn/OpenLMLab/x.git")
    assert not same_host("file:///a.git", "file:///b.git")


def test_unreadable_engine_args_are_a_settings_error(app_modules):
    from xlab_chat.settings import SettingsError, load_settings

    with pytest.raises(SettingsError, match="ENGINE_ARGS cannot be read"):
        load_settings({"ENGINE_ARGS": "--chat-template 'unclosed"}, {"model_repo": "https://h/r.git"})
