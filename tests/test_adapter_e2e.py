"""Deploy an XTuner-style LoRA adapter directly: the app pulls adapter and base, merges in memory, and replies as
the merged model does. Real parts: the trained tiny InternLM2, a peft adapter on its remote-code oracle, bare LFS
remotes, the real app process; the oracle is peft's own merge_and_unload.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import tinymodel
import torch
from apprunner import AppProcess, render
from faultkit import wait_for
from internlm2_fixture import build_internlm2, internlm2_from_llama
from test_lora import make_adapter, oracle_model
from transformers import AutoTokenizer

pytestmark = pytest.mark.e2e
XTUNER = dict(r=8, lora_alpha=16, lora_dropout=0.1, bias="none", target_modules="XTUNER")
EXACT = {"QUANTIZE": "none", "DTYPE": "float32"}  # compared with a float32 oracle


@pytest.fixture(scope="module")
def world(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    base_dir = tmp_path_factory.mktemp("adapter-world")
    base = internlm2_from_llama(tiny_model, base_dir / "base")
    adapters = {fmt: as_xtuner_writes_it(soften(make_adapter(base, base_dir / f"adapter-{fmt}", XTUNER,
                                                             safe=fmt == "safetensors")))
                for fmt in ("safetensors", "bin")}
    other = build_internlm2(base_dir / "other-base", hidden=32)
    wrong = make_adapter(other, base_dir / "adapter-wrong", dict(XTUNER, target_modules=["wqkv", "wo"]), safe=True)
    urls = {name: tinymodel.publish(folder, base_dir / f"{name}.git") for name, folder in
            {"base": base, "safetensors": adapters["safetensors"], "bin": adapters["bin"], "wrong": wrong}.items()}
    return {"base": base, "adapters": adapters, "urls": urls, "dir": base_dir}


def as_xtuner_writes_it(folder: Path) -> Path:
    """`xtuner convert pth_to_hf`'s file set: peft's files plus xtuner_config.py, and the training machine's path
    as base_model_name_or_path."""
    (folder / "xtuner_config.py").write_text("lora = dict(r=8, lora_alpha=16, lora_dropout=0.1)\n")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = "/root/ft/model"
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def soften(folder: Path, factor: float = 0.5) -> Path:
    """Scale every lora_B down: a fine-tune nudges a chat model; a full-strength random update only breaks it."""
    from safetensors.torch import load_file, save_file

    path = next(folder.glob("adapter_model.*"))
    tensors = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(str(path), weights_only=True)
    tensors = {name: t * factor if ".lora_B." in name else t for name, t in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path), metadata={"format": "pt"})
    else:
        torch.save(tensors, str(path))
    return folder


def oracle_reply(base: Path, adapter: Path, message: str, tokens: int = 32) -> str:
    model = oracle_model(base, adapter)
    tokenizer = AutoTokenizer.from_pretrained(str(base), trust_remote_code=True)
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], tokenize=False,
                                         add_generation_prompt=True)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens, do_sample=False,
                             eos_token_id=[2, tokenizer.convert_tokens_to_ids("<|im_end|>")], pad_token_id=2)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def app_for(world: dict, tmp_path: Path, adapter: str, base: str = "", **env: str) -> AppProcess:
    folder = render(tmp_path / "out", model_repo=world["urls"][adapter], base_model_repo=base, hardware="cpu",
                    ui_language="en", validate_model_repo=False)
    return AppProcess(folder, {"MODEL_DIR": str(tmp_path / "adapter"), "BASE_MODEL_DIR": str(tmp_path / "base"),
                               **EXACT, **env}, tmp_path / "app.log")


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_adapter_app_replies_like_the_merged_model(world: dict, tmp_path: Path, fmt: str):
    from gradio_client import Client

    expected = oracle_reply(world["base"], world["adapters"][fmt], tinymodel.GREETING)
    app = app_for(world, tmp_path, fmt, world["urls"]["base"])
    try:
        start = time.monotonic()
        app.wait_stage(("ready",))
        reply = Client(app.url, verbose=False).predict(tinymodel.GREETING, "", 32, 0.0, 0.8, 1.0, api_name="/chat")
        print(f"[adapter {fmt}] ready + reply in {time.monotonic() - start:.1f} s: {reply!r}")
        assert reply == expected and len(reply) >= 4
        assert reply != tinymodel.GREETING_REPLY  # the base alone says this: the adapter really was merged
    finally:
        app.stop()
    assert (tmp_path / "base" / "model.safetensors").is_file() or list((tmp_path / "base").glob("*.safetensors"))
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert not list((tmp_path / "adapter").glob("model*.safetensors"))  # nothing merged was written to disk


def test_the_adapter_is_not_a_no_op(world: dict):
    """The merged model's logits differ from the base's: the reply comparison above can fail."""
    from test_lora import _oracle_base

    tokenizer = AutoTokenizer.from_pretrained(str(world["base"]), trust_remote_code=True)
    ids = torch.tensor([tokenizer(tinymodel.STORY)["input_ids"]])
    with torch.no_grad():
        base = _oracle_base(world["base"])(input_ids=ids).logits
        merged = oracle_model(world["base"], world["adapters"]["safetensors"])(input_ids=ids).logits
    assert float((merged - base).abs().max()) > 1e-2


@pytest.mark.parametrize("case", ["no-base", "wrong-shapes", "base-unreachable"])
def test_bad_adapter_setups_fail_on_the_page_with_the_fix(world: dict, tmp_path: Path, case: str):
    base = {"no-base": "", "wrong-shapes": world["urls"]["base"],
            "base-unreachable": (world["dir"] / "nowhere.git").as_uri()}[case]
    app = app_for(world, tmp_path, "wrong" if case == "wrong-shapes" else "safetensors", base)
    try:
        app.wait_serving()
        wait_for(lambda: app.status()["stage"] == "failed", 120, what="the failure")
        error = app.status()["error"]
        print(f"[{case}] {error}")
        expected = {"no-base": ("LoRA adapter", "BASE_MODEL_REPO", "internlm2-chat-1"),
                    "wrong-shapes": ("4 adapter fits the base", "hidden_size=64", "more like it"),
                    "base-unreachable": ("base", "does not exist")}[case]
        assert all(part in error for part in expected), error
        assert "Traceback" not in app.log
        assert app.status()["stage"] == "failed"  # the page keeps serving its failure
    finally:
        app.stop()


def test_the_check_names_an_adapter_and_checks_its_base(world: dict, app_modules):
    from xlab_chat.model import check

    lines = lambda report: "\n".join(c.line(check.SYMBOLS) for c in report.checks)  # noqa: E731
    good = check.check_repo(world["urls"]["safetensors"], "main", "cpu", base_repo=world["urls"]["base"])
    text = lines(good)
    print(text)
    assert good.ok and "✓ 2 LoRA adapter: r=8, lora_alpha=16" in text and "✓ base 5 weights" in text
    assert "'/root/ft/model' (a path on the training machine: never downloaded" in text
    assert "✓ 4 adapter fits the base" in text and "✓ base 7 fits cpu" in text and "✓ 6 adapter in LFS" in text
    lone = lines(check.check_repo(world["urls"]["safetensors"], "main", "cpu"))
    assert "✗ 3 base model: this repo holds a LoRA adapter" in lone and "internlm2-chat-1.8b" in lone
    wrong = check.check_repo(world["urls"]["wrong"], "main", "cpu", base_repo=world["urls"]["base"])
    assert "✗ 4 adapter fits the base" in lines(wrong) and "hidden_size=64" in lines(wrong)


def test_adapter_config_that_is_not_lora_fails_the_check(world: dict, tmp_path: Path, app_modules):
    from xlab_chat.model import check

    folder = tmp_path / "dora"
    shutil.copytree(world["adapters"]["safetensors"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    config["use_dora"] = True
    (folder / "adapter_config.json").write_text(json.dumps(config))
    report = check.check_repo(tinymodel.publish(folder, tmp_path / "dora.git"), "main", "cpu",
                              base_repo=world["urls"]["base"])
    line = next(c for c in report.checks if c.title == "2 LoRA adapter")
    assert line.status == "fail" and "DoRA" in line.detail
