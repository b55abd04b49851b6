"""engine=llamacpp on real parts: the trained tiny model and the tiny InternLM2 checkpoint converted to GGUF by
the app, checked against llama.cpp's own converter, quantized by llama.cpp, cached and verified beside the
model, and served by the real ``llama_cpp.server`` under the app's launcher, over HTTP.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
import tinymodel
from apprunner import AppProcess, render
from faultkit import wait_for

INSTALL = ("`.venv/bin/python -m pip install 'llama-cpp-python[server]==0.3.36' gguf==0.19.0` (builds llama.cpp from"
           " its sdist: cmake and a C++ compiler, about 15 CPU-minutes)")
try:
    import gguf
    import llama_cpp
except ImportError:
    pytest.skip(f"llama-cpp-python or gguf is not installed: scripts/test.sh needs {INSTALL}", allow_module_level=True)

pytestmark = pytest.mark.e2e
ROOT = Path(__file__).resolve().parents[1]
TEMPLATE_APP = ROOT / "{{cookiecutter.app_name}}"
GREEDY = ("", 64, 0.0, 0.8, 1.0)  # system prompt, max_new_tokens, temperature, top_p, repetition_penalty


def child_env() -> dict:
    """For the converter child started in-process: the template's app package, and no bytecode in it."""
    return {**os.environ, "PYTHONPATH": str(TEMPLATE_APP), "PYTHONDONTWRITEBYTECODE": "1"}


# ---------------------------------------------------------------- the converter against llama.cpp's own


@pytest.fixture(scope="module")
def reference_converter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python sdist of the installed version (from the
    registry once, then kept in .cache/); only its converter, its conversion package and gguf-py are unpacked."""
    cache = ROOT / ".cache" / f"llama-cpp-python-{llama_cpp.__version__}"
    script = cache / "vendor" / "llama.cpp" / "convert_hf_to_gguf.py"
    if not script.is_file():
        download = tmp_path_factory.mktemp("sdist")
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={llama_cpp.__version__}", "-d", str(download)], check=True)
        with tarfile.open(next(download.glob("*.tar.gz"))) as sdist:
            wanted = [m for m in sdist.getmembers() if any(f"/vendor/llama.cpp/{part}" in m.name for part in
                                                           ("convert_hf_to_gguf.py", "conversion/", "gguf-py/"))]
            for member in wanted:
                member.name = member.name.split("/", 1)[1]
            sdist.extractall(cache, members=wanted)
    return script


def gguf_contents(path: Path) -> tuple:
    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items()
              if not name.startswith("GGUF.") and name not in ("general.name", "general.size_label")}
    tensors = {t.name: (int(t.tensor_type), tuple(int(n) for n in t.shape), bytes(t.data.tobytes()))
               for t in reader.tensors}
    return fields, tensors


@pytest.fixture(scope="module")
def internlm2_chat(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trained tiny model as an InternLM2 chat repo (packed wqkv, InternLM2 tokenizer config)."""
    from internlm2_fixture import internlm2_from_llama

    return internlm2_from_llama(tiny_model, tmp_path_factory.mktemp("internlm2") / "model")


@pytest.mark.parametrize("case", ["llama", "internlm2", "internlm2-bf16-dynamic-rope"])
def test_the_app_writes_the_gguf_llama_cpps_converter_writes(case, tiny_model, internlm2_chat, reference_converter,
                                                            app_modules, tmp_path):
    """Same tensors (split, permuted, typed), same tokenizer and hyperparameters, byte for byte."""
    from internlm2_fixture import build_internlm2
    from xlab_chat.engines.gguf_convert import convert

    folder = {"llama": tiny_model, "internlm2": internlm2_chat}.get(case) or build_internlm2(
        tmp_path / "bf16", dtype="bfloat16", rope_scaling={"type": "dynamic", "factor": 2.0})
    theirs = tmp_path / "theirs.gguf"
    outtype = "auto" if "bf16" in case else "f32"
    subprocess.run([sys.executable, str(reference_converter), str(folder), "--outfile", str(theirs), "--outtype",
                    outtype], check=True, capture_output=True)
    ours = convert(folder, tmp_path / "ours.gguf")
    their_fields, their_tensors = gguf_contents(theirs)
    our_fields, our_tensors = gguf_contents(ours)
    assert our_fields == their_fields
    assert our_tensors.keys() == their_tensors.keys() and our_tensors == their_tensors
    if case.startswith("internlm2"):
        assert our_fields["general.architecture"] == "internlm2"
        im_end = our_fields["tokenizer.ggml.tokens"].index("<|im_end|>")
        assert our_fields["tokenizer.ggml.eos_token_id"] == im_end  # a chat turn ends the reply
    if "bf16" in case:
        assert {t[0] for name, t in our_tensors.items() if name.endswith("attn_q.weight")} == {
            int(gguf.GGMLQuantizationType.BF16)}


def test_a_checkpoint_the_app_cannot_convert_is_refused_with_the_fix(tiny_model, app_modules, tmp_path):
    from xlab_chat.engines.gguf_convert import ConversionError, convert

    folder = tmp_path / "qwen"
    shutil.copytree(tiny_model, folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "architectures": ["Qwen2ForCausalLM"]}))
    with pytest.raises(ConversionError, match="Qwen2ForCausalLM.*add a .gguf file"):
        convert(folder, tmp_path / "out.gguf")
    assert not (tmp_path / "out.gguf").exists()


# ---------------------------------------------------------------- the cache beside the model


@pytest.fixture()
def model_copy(tiny_model: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    return folder


def test_the_gguf_is_made_once_reused_and_remade_when_broken_or_outdated(model_copy, app_modules, capfd):
    from xlab_chat.engines.llamacpp import gguf_for
    from xlab_chat.model import gguf_cache

    first = gguf_for(model_copy, "int8", child_env())
    assert first == model_copy.parent / "model-gguf" / "model-Q8_0.gguf"
    assert gguf.GGUFReader(str(first)).fields["general.file_type"].contents() == llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    assert "making model-Q8_0.gguf: not made yet" in capfd.readouterr().out
    assert sorted(p.name for p in first.parent.iterdir()) == ["model-Q8_0.gguf", "model-Q8_0.gguf.json"]

    made = first.stat().st_mtime_ns
    assert gguf_for(model_copy, "int8", child_env()) == first and first.stat().st_mtime_ns == made
    assert "is current" in capfd.readouterr().out

    broken = {"corrupted": lambda data: data[:1000] + bytes([data[1000] ^ 0xFF]) + data[1001:],
              "cut short": lambda data: data[: len(data) // 2]}
    for name, damage in broken.items():
        first.write_bytes(damage(first.read_bytes()))
        assert gguf_for(model_copy, "int8", child_env()) == first
        assert "its bytes differ from those recorded" in capfd.readouterr().out, name
        assert not gguf_cache.why_not_current(model_copy, first, "Q8_0")

    (model_copy / "config.json").write_text((model_copy / "config.json").read_text() + "\n")
    gguf_for(model_copy, "int8", child_env())
    assert "the model changed since it was made" in capfd.readouterr().out


def test_an_interrupted_conversion_leaves_nothing_that_is_run(model_copy, app_modules, capfd):
    from xlab_chat.engines.llamacpp import gguf_for

    target = model_copy.parent / "model-gguf" / "model-Q8_0.gguf"
    target.parent.mkdir()
    target.write_bytes(b"GGUF half")  # a conversion killed before its stamp was written
    (target.parent / "model-Q8_0.gguf.partial-123").write_bytes(b"GGUF")
    assert gguf_for(model_copy, "int8", child_env()) == target
    assert "its stamp is missing" in capfd.readouterr().out
    assert sorted(p.name for p in target.parent.iterdir()) == ["model-Q8_0.gguf", "model-Q8_0.gguf.json"]


def test_a_repo_that_ships_a_gguf_is_run_as_it_is(model_copy, app_modules, tmp_path):
    from xlab_chat.engines.llamacpp import gguf_for

    for name in ("tiny-q8_0.gguf", "tiny-Q4_K_M.gguf"):
        (model_copy / name).write_bytes(b"GGUF")
    assert gguf_for(model_copy, "auto", child_env()).name == "tiny-Q4_K_M.gguf"
    assert gguf_for(model_copy, "int8", child_env()).name == "tiny-q8_0.gguf"
    assert not (model_copy.parent / "model-gguf").exists()


def test_a_failed_conversion_is_a_clear_error(model_copy, app_modules):
    from xlab_chat.engines.llamacpp import gguf_for
    from xlab_chat.engines.openai_api import EndpointError

    (model_copy / "tokenizer.model").unlink()
    with pytest.raises(EndpointError, match="could not be converted to GGUF") as caught:
        gguf_for(model_copy, "auto", child_env())
    assert "ship its own .gguf" in caught.value.fix
    assert not any((model_copy.parent / "model-gguf").iterdir())


def test_the_server_preset_suits_a_small_cpu_and_many_users(model_copy, app_modules, monkeypatch):
    from xlab_chat.engines import llamacpp, server

    monkeypatch.setattr(llamacpp, "gguf_for", lambda folder, quantize, env, progress: folder / "m.gguf")
    monkeypatch.setattr(llamacpp, "cpu_budget", lambda: 2)
    argv = server.command_line("llamacpp", model_copy, 8000, "--n_ctx 8192", quantize="auto")
    assert argv[:3] == [sys.executable, "-m", "llama_cpp.server"]
    flags = dict(zip(argv[3::2], argv[4::2]))
    assert flags == {"--model": str(model_copy / "m.gguf"), "--model_alias": str(model_copy), "--host": "127.0.0.1",
                     "--port": "8000", "--n_ctx": "8192", "--n_threads": "2", "--n_threads_batch": "2",
                     "--use_mlock": "false", "--logits_all": "false", "--interrupt_requests": "false"}
    assert argv[-2:] == ["--n_ctx", "8192"]  # ENGINE_ARGS come last, so they win
    from llama_cpp.server.settings import ModelSettings, ServerSettings

    known = set(ModelSettings.model_fields) | set(ServerSettings.model_fields)
    assert {flag[2:] for flag in flags} <= known  # every flag is one the installed server reads


# ---------------------------------------------------------------- the app over HTTP


@pytest.fixture(scope="module")
def llamacpp_app(internlm2_chat: Path, tmp_path_factory: pytest.TempPathFactory):
    """The rendered app with engine=llamacpp on the trained tiny model as an InternLM2 repo, ready (Q4_K_M)."""
    from internlm2_fixture import publish_internlm2

    work = tmp_path_factory.mktemp("llamacpp-app")
    remote = publish_internlm2(internlm2_chat, work / "remote.git")
    folder = render(work / "out", model_repo=remote, engine="llamacpp", hardware="cpu", ui_language="en",
                    validate_model_repo=False)
    app = AppProcess(folder, {"MODEL_DIR": str(work / "weights"), "CONCURRENCY_LIMIT": "4",
                              "ENGINE_START_TIMEOUT": "300"}, work / "app.log")
    try:
        app.wait_stage(("ready",), timeout=300)
        yield app
    finally:
        app.stop()


def chat(url: str, message: str, params: tuple = GREEDY) -> str:
    from gradio_client import Client

    return Client(url, verbose=False).predict(message, *params, api_name="/chat")


def test_the_app_converts_then_serves_and_names_the_engine(llamacpp_app):
    app = llamacpp_app
    assert "making model-Q4_K_M.gguf: not made yet" in app.log
    assert app.status()["device"] == "llama.cpp · CPU · Q4_K_M"
    assert (app.folder.parent.parent / "weights-gguf" / "model-Q4_K_M.gguf.json").is_file()  # beside MODEL_DIR
    assert "--interrupt_requests false" in app.log and "Traceback" not in app.log
    assert chat(app.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY


def test_stop_closes_the_stream_and_the_server_stops_generating(llamacpp_app):
    from gradio_client import Client

    app = llamacpp_app
    job = Client(app.url, verbose=False).submit(tinymodel.STORY, "", 3000, 0.0, 0.8, 1.0, api_name="/chat")
    wait_for(lambda: len(job.outputs()) >= 3, 60, interval=0.05, what="a streaming reply")
    job.cancel()
    wait_for(lambda: "Disconnected from client" in app.log, 20, what="the server to see the stream closed")
    wait_for(lambda: app.status()["generating"] == 0, 10, what="the slot to be free")
    assert chat(app.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY


def test_two_users_at_once_both_get_whole_replies(llamacpp_app):
    """The server runs one reply at a time; with its interrupt_requests default the second request would end
    the first reply early (with a normal [DONE]), so the first user would get a silently cut reply."""
    from gradio_client import Client

    app = llamacpp_app
    story = Client(app.url, verbose=False).submit(tinymodel.STORY, "", 200, 0.0, 0.8, 1.0, api_name="/chat")
    wait_for(lambda: len(story.outputs()) >= 2, 60, interval=0.02, what="the first reply to stream")
    started = time.monotonic()
    assert chat(app.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY
    reply = story.result(timeout=120)
    assert reply.count("la") >= 100, (reply, time.monotonic() - started)  # the model's whole story: 120 la


def test_the_restart_reuses_the_verified_gguf(llamacpp_app, tmp_path):
    app = llamacpp_app
    again = AppProcess(app.folder, {"MODEL_DIR": str(app.folder.parent.parent / "weights")}, tmp_path / "again.log")
    try:
        again.wait_stage(("ready",), timeout=240)
        assert "model-Q4_K_M.gguf is current" in again.log and "making model-" not in again.log
        assert chat(again.url, tinymodel.GREETING) == tinymodel.GREETING_REPLY
    finally:
        again.stop()


# ---------------------------------------------------------------- the checks before deploying


def test_the_answers_and_the_repo_are_checked_for_llamacpp(app_modules):
    from xlab_chat.model.llamacpp_check import answer_problems, repo_verdict

    assert answer_problems({"engine": "llamacpp", "hardware": "cpu"}) == []
    [(what, fix)] = answer_problems({"engine": "llamacpp", "hardware": "a10-24gb"})
    assert "runs on the CPU" in what and "hardware cpu" in fix
    internlm2 = {"architectures": ["InternLM2ForCausalLM"]}
    assert repo_verdict(["config.json", "tokenizer.model", "model.safetensors"], internlm2)[0]
    assert repo_verdict(["config.json", "x-Q4_K_M.gguf"], {"architectures": ["Qwen2ForCausalLM"]})[0]
    awq = repo_verdict(["config.json", "tokenizer.model"],
                       {**internlm2, "quantization_config": {"quant_method": "awq"}})
    assert not awq[0] and "AWQ" in awq[1] and "float model" in awq[2]
    assert not repo_verdict(["config.json", "tokenizer.json"], internlm2)[0]
