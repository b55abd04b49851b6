"""An InternLM2 repo served by the rendered app: natively (as Llama, no repo code) and with its remote code.

The repo is the trained tiny chat Llama (conftest's ``tiny_model``) packed into InternLM2's layout by
``internlm2_fixture.internlm2_from_llama``, with the repo's own remote code (configuration, modelling and
InternLM2Tokenizer). Each of its .py files appends its module name to ``$INTERNLM2_IMPORT_LOG`` when
imported, so the test sees whether the app ran code from the model repo.

Runs: loader=native on gradio 6 + transformers 5, and loader=remote-code and loader=native on the legacy
stack (gradio 4.44 + transformers 4.46, inside the remote code's 4.34-4.48 window).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import internlm2_fixture as fx
import pytest
import tinymodel
from apprunner import AppProcess, render, stream_chat

pytestmark = pytest.mark.e2e
GREEDY = {"system_prompt": "", "max_new_tokens": 64, "temperature": 0.0, "top_p": 0.8, "repetition_penalty": 1.0}
REPO_MODULES = ["configuration_internlm2", "modeling_internlm2", "tokenization_internlm2"]
MARKER = "import os as _os\nif _os.environ.get('INTERNLM2_IMPORT_LOG'):\n" \
         "    open(_os.environ['INTERNLM2_IMPORT_LOG'], 'a').write(__name__ + '\\n')\n"


@pytest.fixture(scope="module")
def internlm2_model(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The InternLM2 chat model folder, its .py files logging their imports."""
    folder = fx.internlm2_from_llama(tiny_model, tmp_path_factory.mktemp("internlm2-e2e") / "model")
    for name in REPO_MODULES:
        path = folder / f"{name}.py"
        path.write_text(MARKER + path.read_text(encoding="utf-8"), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def internlm2_remote(internlm2_model: Path) -> str:
    """file:// URL of a bare LFS repo holding the InternLM2 chat model, as a hub would serve it."""
    return fx.publish_internlm2(internlm2_model, internlm2_model.parent / "internlm2-chat.git")


def test_packing_is_the_exact_inverse_of_the_app_converter(tiny_model: Path, app_modules: Path) -> None:
    from safetensors.torch import load_file
    from xlab_chat.engines import internlm2

    llama = load_file(str(tiny_model / "model.safetensors"))
    config = json.loads((tiny_model / "config.json").read_text(encoding="utf-8"))
    packed = fx.pack_llama_state_dict(llama, config)
    assert "model.layers.0.attention.wqkv.weight" in packed and not any("proj" in name for name in packed)
    back = internlm2.convert_state_dict(packed, config)
    assert sorted(back) == sorted(llama)
    assert all(back[name].equal(llama[name]) for name in llama)


TOKENIZER_PROBE = """
import json, sys
sys.path.insert(0, sys.argv[1])
import transformers, tinymodel
from xlab_chat.engines import internlm2
from transformers import AutoTokenizer
folder = sys.argv[2]
remote = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
native = internlm2.native_tokenizer(folder)
texts = [tinymodel.GREETING_REPLY, *[q + a for q, a in tinymodel.CHATS], tinymodel.STORY,
         remote.apply_chat_template([{"role": "user", "content": tinymodel.GREETING}], tokenize=False,
                                    add_generation_prompt=True)]
ids = [remote(t)["input_ids"] for t in texts]
print(json.dumps({"version": transformers.__version__, "class": type(remote).__module__ + "." + type(remote).__name__,
                  "same": ids == [native(t)["input_ids"] for t in texts],
                  "decoded": [remote.decode(i, skip_special_tokens=True) for i in ids[:-1]],
                  "texts": texts[:-1], "stops": [remote.eos_token_id, remote.convert_tokens_to_ids("<|im_end|>")]}))
"""


@pytest.mark.parametrize("stack", ["main", "legacy"])
def test_remote_tokenizer_agrees_with_the_native_one(stack: str, internlm2_model: Path, app_modules: Path,
                                                     tmp_path: Path, request: pytest.FixtureRequest) -> None:
    python = request.getfixturevalue("legacy_python") if stack == "legacy" else sys.executable
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parent)}
    done = subprocess.run([python, "-c", TOKENIZER_PROBE, str(app_modules), str(internlm2_model)],
                          capture_output=True, text=True, timeout=180, env=env, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["version"].startswith("4." if stack == "legacy" else "5."), result["version"]
    assert result["class"].startswith("transformers_modules.") and result["class"].endswith(".InternLM2Tokenizer")
    assert result["same"]
    assert result["decoded"] == result["texts"]
    assert result["stops"] == [2, fx.tinymodel_im_end_id(internlm2_model)]


@pytest.fixture(scope="module", params=["native-gradio6", "remote-code-legacy", "native-legacy"])
def served(request: pytest.FixtureRequest, internlm2_remote: str, tmp_path_factory: pytest.TempPathFactory):
    """(app, import log, loader, transformers major) for one loader on one stack, serving until the module ends."""
    loader, stack = request.param.rsplit("-", 1)
    python = request.getfixturevalue("legacy_python") if stack == "legacy" else sys.executable
    base = tmp_path_factory.mktemp(request.param)
    folder = render(base / "out", model_repo=internlm2_remote, loader=loader, hardware="cpu", ui_language="en",
                    validate_model_repo=False, temperature=0)
    imports = base / "imports.log"
    env = {"MODEL_DIR": str(base / "weights"), "HF_MODULES_CACHE": str(base / "hf-modules"), "HF_HUB_OFFLINE": "1",
           "INTERNLM2_IMPORT_LOG": str(imports)}
    app = AppProcess(folder, env, base / "app.log", python)
    try:
        app.wait_stage(("ready",))
        yield app, imports, loader, "4" if stack == "legacy" else "5"
    finally:
        app.stop()


def test_rendered_loader_and_stack(served) -> None:
    app, _, loader, major = served
    defaults = json.loads((app.folder / "settings.json").read_text(encoding="utf-8"))
    assert (defaults["loader"], defaults["temperature"]) == (loader, 0.0)
    assert app.status()["stage"] == "ready"
    done = subprocess.run([app.process.args[0], "-c", "import transformers; print(transformers.__version__)"],
                          capture_output=True, text=True, timeout=120, check=True)
    assert done.stdout.strip().startswith(major + "."), done.stdout


def test_greedy_chat_streams_the_trained_reply(served) -> None:
    app, _, _, _ = served
    updates = stream_chat(app.url, tinymodel.GREETING, **GREEDY)
    assert updates[-1] == tinymodel.GREETING_REPLY, app.log[-3000:]
    # Streamed: the first token goes out alone, the rest at the page's cadence (a short reply fits one beat).
    assert len(updates) >= 2 and len(updates[0]) < len(updates[-1])
    assert all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:]))
    assert not any("<|im_end|>" in text or "<|im_start|>" in text for text in updates)
    assert stream_chat(app.url, tinymodel.GREETING, **GREEDY)[-1] == tinymodel.GREETING_REPLY  # same twice


def test_repo_code_runs_only_with_remote_code(served) -> None:
    _, imports, loader, _ = served
    imported = sorted({line.rsplit(".", 1)[-1] for line in imports.read_text().split()}) if imports.exists() else []
    assert imported == (REPO_MODULES if loader == "remote-code" else [])
