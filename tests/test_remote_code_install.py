"""The generated requirements.txt for loader=remote-code installs everything InternLM2's remote code imports.

A fresh Python 3.11 venv gets the CPU torch first (as a platform's preinstalled torch; pinned, so nothing
can pull the CUDA build), then exactly the rendered requirements.txt from the package registry (pip's
cache makes reruns fast). In it, transformers loads a repo laid out like internlm2-chat-7b
(``internlm2_fixture.build_internlm2_like_7b``) with ``trust_remote_code=True``: the modelling code that
imports einops, and the fast tokenizer that converts tokenizer.model (tokenizers, sentencepiece, protobuf).
The greedy reply is the one the tiny model was trained to give.

To show the check can fail, einops is then uninstalled and the same load must stop with transformers'
"requires the following packages ... einops" ImportError.

This test reaches the package registry (PyPI); it needs ``python3.11`` on PATH.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import internlm2_fixture as fx
import pytest
import tinymodel
from apprunner import render
from packaging.version import Version

LOAD_PROBE = r"""
import json, sys
import torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
folder, question = sys.argv[1], sys.argv[2]
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
prompt = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
inputs = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
with torch.no_grad():
    out = model.generate(**inputs, max_new_tokens=40, do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps({"transformers": transformers.__version__, "torch": torch.__version__,
                  "model": type(model).__module__ + "." + type(model).__name__,
                  "tokenizer": type(tokenizer).__module__ + "." + type(tokenizer).__name__,
                  "ids": new, "reply": tokenizer.decode(new, skip_special_tokens=True)}))
"""


def _run(args: list, timeout: float, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, check=False)
    if check and done.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} exited {done.returncode}:\n{done.stdout[-3000:]}\n"
                             f"{done.stderr[-5000:]}")
    return done


@pytest.fixture(scope="module")
def repo_7b(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.build_internlm2_like_7b(tmp_path_factory.mktemp("install-like-7b") / "internlm2-chat-7b", tiny_model)


@pytest.mark.timeout(900)
def test_fresh_venv_from_the_rendered_requirements_runs_the_remote_code(repo_7b: Path, tmp_path: Path) -> None:
    python311 = shutil.which("python3.11")
    assert python311, "python3.11 is not on PATH"
    app = render(tmp_path / "out", loader="remote-code", validate_model_repo=False, hardware="cpu")
    requirements = app / "requirements.txt"
    assert "einops" in requirements.read_text(encoding="utf-8")

    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env.update({"HF_HUB_OFFLINE": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
    venv = tmp_path / "venv"
    python = str(venv / "bin" / "python")
    timings = {}
    start = time.monotonic()
    _run([python311, "-m", "venv", str(venv)], 120, env)
    _run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], 600, env)
    timings["venv + torch"] = time.monotonic() - start
    start = time.monotonic()
    _run([python, "-m", "pip", "install", "-q", "-r", str(requirements)], 600, env)
    timings["requirements"] = time.monotonic() - start
    _run([python, "-m", "pip", "check"], 120, env)
    installed = {d["name"].lower(): d["version"]
                 for d in json.loads(_run([python, "-m", "pip", "list", "--format=json"], 120, env).stdout)}
    assert installed["torch"].endswith("+cpu"), installed["torch"]  # the preinstalled torch was kept
    assert not [name for name in installed if name.startswith("nvidia-")], sorted(installed)
    assert Version("4.38") <= Version(installed["transformers"]) < Version("4.49"), installed["transformers"]

    question, reply = tinymodel.CHATS[0]
    start = time.monotonic()
    done = _run([python, "-c", LOAD_PROBE, str(repo_7b), question], 300,
                {**env, "HF_MODULES_CACHE": str(tmp_path / "hf-modules")})
    timings["load + generate"] = time.monotonic() - start
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["model"].endswith(".modeling_internlm2.InternLM2ForCausalLM"), result
    assert result["tokenizer"].endswith(".tokenization_internlm2_fast.InternLM2TokenizerFast"), result
    assert result["reply"] == reply, result
    assert result["ids"][-1] == fx.tinymodel_im_end_id(repo_7b), result  # stopped on <|im_end|>

    # The same venv without einops: transformers refuses the repo's modelling code and names the package.
    _run([python, "-m", "pip", "uninstall", "-y", "-q", "einops"], 120, env)
    failed = _run([python, "-c", LOAD_PROBE, str(repo_7b), question], 300,
                  {**env, "HF_MODULES_CACHE": str(tmp_path / "hf-modules-2")}, check=False)
    assert failed.returncode != 0
    assert "ImportError" in failed.stderr and "requires the following packages" in failed.stderr, failed.stderr
    assert "einops" in failed.stderr.split("requires the following packages")[1], failed.stderr[-2000:]
    print(f"transformers {installed['transformers']}, gradio {installed.get('gradio')}; timings (s): "
          + ", ".join(f"{k} {v:.0f}" for k, v in timings.items()))
