"""engine=llamacpp in the repo check (stdlib, no llama.cpp needed): the hook's answers and the repo's verdict."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def test_a_gpu_hardware_answer_is_refused_for_the_cpu_engine(app_modules: Path) -> None:
    from xlab_chat.model.check import check_answers

    answers = {"app_name": "demo", "engine": "llamacpp", "hardware": "a10-24gb", "loader": "native",
               "quantize": "auto", "model_repo": "https://huggingface.co/o/r", "model_revision": "main",
               "validate_model_repo": True, "max_new_tokens": 16, "temperature": 0.5, "top_p": 0.5,
               "repetition_penalty": 1.0}
    assert [what for what, _ in check_answers(answers)] == ["engine=llamacpp runs on the CPU, but hardware is"
                                                            " a10-24gb"]
    assert check_answers({**answers, "hardware": "cpu"}) == []


def test_the_check_says_what_llamacpp_will_do_with_the_repo(app_modules: Path, model_remote: str,
                                                            tiny_model: Path, tmp_path: Path) -> None:
    from xlab_chat.model.check import check_repo

    verdict = {c.title: c for c in check_repo(model_remote, hardware="cpu", engine="llamacpp").checks}
    assert verdict["9 engine llamacpp"].status == "ok", verdict["9 engine llamacpp"]
    assert "converted once to GGUF" in verdict["9 engine llamacpp"].detail
    other = tmp_path / "other-arch"
    shutil.copytree(tiny_model, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "architectures": ["MistralForCausalLM"]}))
    refused = {c.title: c for c in check_repo(str(other), hardware="cpu", engine="llamacpp").checks}
    assert refused["9 engine llamacpp"].status == "fail" and ".gguf" in refused["9 engine llamacpp"].fix
