"""A model repo laid out like the real internlm2-chat-7b, end to end.

The trained tiny chat Llama (conftest's ``tiny_model``) is packed by
``internlm2_fixture.build_internlm2_like_7b`` into internlm2-chat-7b's file set: 8 safetensors shards with
their index, upstream-shaped config.json / generation_config.json / special_tokens_map.json /
tokenizer_config.json, a sentencepiece tokenizer.model with the identity normaliser and no tokenizer.json,
and the remote code, including a fast tokenizer that converts tokenizer.model at load time (AutoTokenizer
picks it over the slow one, as it does for the real repo).

Checks: the layout itself; slow, fast and the app's native tokenizer give the same ids (transformers 4.46,
inside the remote code's window), and the check can fail (an NFKC tokenizer.model splits slow from fast);
the rendered app serves the repo natively (gradio 6 + transformers 5) and with loader=remote-code (gradio
4.44 + transformers 4.46) with the same greedy replies; the repo check passes it.
"""

from __future__ import annotations

import ast
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import internlm2_fixture as fx
import pytest
import tinymodel
from apprunner import AppProcess, render, stream_chat

SHARDS = [f"model-{n:05d}-of-00008.safetensors" for n in range(1, 9)]
REMOTE_CODE = ["configuration_internlm2.py", "modeling_internlm2.py", "tokenization_internlm2.py",
               "tokenization_internlm2_fast.py"]
UPSTREAM_FILES = {"README.md", "config.json", "generation_config.json", "model.safetensors.index.json",
                  "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json", *SHARDS, *REMOTE_CODE}
GREEDY = {"system_prompt": "", "max_new_tokens": 64, "temperature": 0.0, "top_p": 0.8, "repetition_penalty": 1.0}
# (question, the reply the tiny model was trained to give)
ASKS = [tinymodel.CHATS[0], tinymodel.CHATS[1], tinymodel.CHATS[3]]


@pytest.fixture(scope="module")
def repo_7b(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return fx.build_internlm2_like_7b(tmp_path_factory.mktemp("like-7b") / "internlm2-chat-7b", tiny_model)


@pytest.fixture(scope="module")
def remote_7b(repo_7b: Path) -> str:
    return fx.publish_internlm2(repo_7b, repo_7b.parent / "internlm2-chat-7b.git")


def _json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------- the layout


def test_layout_has_upstreams_files_and_metadata(repo_7b: Path) -> None:
    from safetensors import safe_open

    assert {p.name for p in repo_7b.iterdir()} == UPSTREAM_FILES  # no tokenizer.json, no single model file
    index = _json(repo_7b / "model.safetensors.index.json")
    assert sorted(set(index["weight_map"].values())) == SHARDS
    total = 0
    for shard in SHARDS:
        with safe_open(str(repo_7b / shard), framework="pt") as handle:
            names = list(handle.keys())
            assert names and all(index["weight_map"][n] == shard for n in names)
            assert handle.metadata() == {"format": "pt"}
            total += sum(handle.get_tensor(n).numel() * handle.get_tensor(n).element_size() for n in names)
    assert index["metadata"]["total_size"] == total

    config = _json(repo_7b / "config.json")
    assert config["auto_map"] == {"AutoConfig": "configuration_internlm2.InternLM2Config",
                                  "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                                  "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    assert (config["model_type"], config["architectures"]) == ("internlm2", ["InternLM2ForCausalLM"])
    assert (config["bias"], config["tie_word_embeddings"], config["hidden_act"]) == (False, False, "silu")
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    assert config["rope_scaling"] == {"type": "dynamic", "factor": 2.0}
    im_end = fx.tinymodel_im_end_id(repo_7b)
    assert _json(repo_7b / "generation_config.json") == {"bos_token_id": 1, "eos_token_id": [2, im_end],
                                                         "pad_token_id": 2, "transformers_version": "4.37.1"}
    assert _json(repo_7b / "special_tokens_map.json") == {"bos_token": "<s>", "eos_token": "</s>",
                                                          "pad_token": "</s>", "unk_token": "<unk>"}
    tok = _json(repo_7b / "tokenizer_config.json")
    assert tok["auto_map"]["AutoTokenizer"] == ["tokenization_internlm2.InternLM2Tokenizer",
                                                "tokenization_internlm2_fast.InternLM2TokenizerFast"]
    assert tok["tokenizer_class"] == "InternLM2Tokenizer" and tok["chat_template"] == tinymodel.CHAT_TEMPLATE
    decoder = {int(i): e["content"] for i, e in tok["added_tokens_decoder"].items()}
    assert decoder[0] == "<unk>" and decoder[1] == "<s>" and decoder[2] == "</s>"
    assert decoder[im_end] == "<|im_end|>" and "<|im_start|>" in decoder.values()
    assert all(e["special"] and not e["normalized"] for e in tok["added_tokens_decoder"].values())


def test_tokenizer_model_is_byte_fallback_bpe_without_nfkc(repo_7b: Path) -> None:
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((repo_7b / "tokenizer.model").read_bytes())
    assert proto.trainer_spec.model_type == proto.trainer_spec.BPE and proto.trainer_spec.byte_fallback
    assert proto.normalizer_spec.name == "identity" and not proto.normalizer_spec.precompiled_charsmap
    assert [proto.pieces[i].piece for i in range(3)] == ["<unk>", "<s>", "</s>"]


def _imports(source: str) -> set:
    """Module-level imports as 'module:name' strings (relative ones keep their dots)."""
    found = set()
    for node in ast.parse(source).body:
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            found |= {"." * node.level + (node.module or "") + ":" + alias.name for alias in node.names}
    return found


def test_remote_code_imports_what_upstreams_files_import(repo_7b: Path) -> None:
    """The third-party imports of the fixture's remote code are upstream's (research notes, section 1)."""
    fast = _imports((repo_7b / "tokenization_internlm2_fast.py").read_text(encoding="utf-8"))
    assert {"tokenizers:Tokenizer", "tokenizers:decoders", "tokenizers:normalizers", "tokenizers:processors",
            "tokenizers.models:BPE", "transformers.convert_slow_tokenizer:SLOW_TO_FAST_CONVERTERS",
            "transformers.convert_slow_tokenizer:SentencePieceExtractor",
            "transformers.convert_slow_tokenizer:SpmConverter",
            "transformers.tokenization_utils_fast:PreTrainedTokenizerFast",
            ".tokenization_internlm2:InternLM2Tokenizer"} <= fast
    slow = _imports((repo_7b / "tokenization_internlm2.py").read_text(encoding="utf-8"))
    modeling = _imports((repo_7b / "modeling_internlm2.py").read_text(encoding="utf-8"))
    assert "sentencepiece" in slow and "einops:rearrange" in modeling and "torch" in modeling
    third_party = {name.split(":")[0].split(".")[0] for name in fast | slow | modeling if not name.startswith(".")}
    assert third_party - {"os", "shutil", "math", "typing"} == {"tokenizers", "transformers", "sentencepiece",
                                                                  "torch", "einops"}


# ---------------------------------------------------------------- slow, fast and native tokenizers

TOKENIZER_PROBE = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from xlab_chat.engines import internlm2
import transformers
from transformers import AutoTokenizer
folder, texts = sys.argv[2], json.loads(sys.argv[3])
fast = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
slow = AutoTokenizer.from_pretrained(folder, trust_remote_code=True, use_fast=False)
native = internlm2.native_tokenizer(folder)
chat = [{"role": "system", "content": "你是小助手"}, {"role": "user", "content": "你好"},
        {"role": "assistant", "content": "你好！"}, {"role": "user", "content": "What is 2+2?"}]
texts.append(slow.apply_chat_template(chat, tokenize=False, add_generation_prompt=True))
out = {"version": transformers.__version__, "fast": type(fast).__module__ + "." + type(fast).__name__,
       "slow": type(slow).__module__ + "." + type(slow).__name__, "is_fast": fast.is_fast, "texts": texts,
       "stops": [[t.eos_token_id, t.convert_tokens_to_ids("<|im_end|>")] for t in (fast, slow, native)]}
for name, tok in (("fast", fast), ("slow", slow), ("native", native)):
    out[name + "_ids"] = [tok(t)["input_ids"] for t in texts]
    out[name + "_plain"] = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    out[name + "_decoded"] = [tok.decode(i, skip_special_tokens=True) for i in out[name + "_ids"]]
print(json.dumps(out))
"""
SAMPLES = [
    *[q for q, _ in tinymodel.CHATS], *[a for _, a in tinymodel.CHATS],
    "今天天气怎么样？我想学习量子力学，谢谢！",  # characters the tokenizer never saw: byte fallback
    "全角标点：（一）「二」１２３ＡＢＣ～",  # NFKC would rewrite every one of these
    "Hello,  two  spaces,\ttab and\nnewline; trailing space ",
    " leading space and 😀🦙 emoji",
    "<|im_start|>user\n你好<|im_end|>\n",
]


def _probe(python: str, app_modules: Path, folder: Path, hf_modules: Path) -> dict:
    env = {**os.environ, "HF_MODULES_CACHE": str(hf_modules), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([python, "-c", TOKENIZER_PROBE, str(app_modules), str(folder), json.dumps(SAMPLES)],
                          capture_output=True, text=True, timeout=300, env=env, check=False)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_slow_fast_and_native_tokenizers_agree(repo_7b: Path, app_modules: Path, legacy_python: str,
                                               tmp_path: Path) -> None:
    result = _probe(legacy_python, app_modules, repo_7b, tmp_path / "hf-modules")
    assert result["version"].startswith("4.")
    assert result["fast"].startswith("transformers_modules.") and result["is_fast"]
    assert result["fast"].endswith(".tokenization_internlm2_fast.InternLM2TokenizerFast"), result["fast"]
    assert result["slow"].endswith(".tokenization_internlm2.InternLM2Tokenizer"), result["slow"]
    for kind in ("ids", "plain"):
        for text, fast, slow, native in zip(result["texts"], result["fast_" + kind], result["slow_" + kind],
                                            result["native_" + kind]):
            assert fast == slow == native, (kind, text, fast, slow, native)
    assert all(ids[0] == 1 for ids in result["fast_ids"])  # bos first, once
    im_end = fx.tinymodel_im_end_id(repo_7b)
    assert result["stops"] == [[2, im_end]] * 3
    assert im_end in result["fast_ids"][-1] and len(result["fast_ids"][-1]) > 3
    assert result["fast_decoded"] == result["slow_decoded"]
    plain_texts = result["texts"][:len(SAMPLES) - 1]  # the ones without special tokens read back as they are
    assert result["slow_decoded"][:len(plain_texts)] == plain_texts
    # transformers 4.x's LlamaTokenizer (the native tokenizer there) drops a text's leading space on decode;
    # the app decodes overlapping windows, so only that first space is at stake.
    assert [t.lstrip(" ") for t in result["native_decoded"]] == [t.lstrip(" ") for t in result["slow_decoded"]]


def test_tokenizer_check_fails_for_an_nfkc_tokenizer_model(repo_7b: Path, tiny_model: Path, app_modules: Path,
                                                            legacy_python: str, tmp_path: Path) -> None:
    """The same repo with the Llama's own tokenizer.model (sentencepiece's default NFKC normaliser): the
    slow tokenizer rewrites full-width characters, the converted fast one cannot, so they part."""
    nfkc = tmp_path / "nfkc"
    shutil.copytree(repo_7b, nfkc)
    shutil.copyfile(tiny_model / "tokenizer.model", nfkc / "tokenizer.model")
    result = _probe(legacy_python, app_modules, nfkc, tmp_path / "hf-modules")
    differ = [text for text, fast, slow in zip(result["texts"], result["fast_plain"], result["slow_plain"])
              if fast != slow]
    assert "全角标点：（一）「二」１２３ＡＢＣ～" in differ


# ---------------------------------------------------------------- the rendered app, both loaders


def _serve_and_chat(remote: str, loader: str, python: str, base: Path) -> list:
    """Render with this loader, start the app on this interpreter, ask ASKS greedily; the final replies."""
    folder = render(base / "out", model_repo=remote, loader=loader, hardware="cpu", ui_language="en",
                    validate_model_repo=False, temperature=0)
    weights, modules = base / "weights", base / "hf-modules"
    env = {"MODEL_DIR": str(weights), "HF_MODULES_CACHE": str(modules), "HF_HUB_OFFLINE": "1"}
    app = AppProcess(folder, env, base / "app.log", python)
    try:
        app.wait_stage(("ready",), timeout=300)
        replies = []
        for question, _ in ASKS:
            updates = stream_chat(app.url, question, **GREEDY)
            assert updates and not any("<|im_end|>" in u or "<|im_start|>" in u for u in updates), app.log[-3000:]
            assert all(later.startswith(earlier) for earlier, later in zip(updates, updates[1:]))
            replies.append(updates[-1])
    finally:
        app.stop()
    downloaded = {p.name for p in weights.rglob("*") if p.is_file() and ".git" not in p.relative_to(weights).parts}
    assert set(SHARDS) <= downloaded and "tokenizer.json" not in downloaded, sorted(downloaded)
    fetched = {p.name for p in modules.rglob("*.py")} if modules.exists() else set()
    if loader == "remote-code":  # AutoTokenizer took the fast class, which pulls in the slow one
        assert set(REMOTE_CODE) <= fetched, sorted(fetched)
    else:
        assert not fetched & set(REMOTE_CODE), sorted(fetched)
    return replies


@pytest.mark.e2e
@pytest.mark.timeout(1200)
def test_both_loaders_serve_the_7b_layout_with_the_same_greedy_replies(remote_7b: str, legacy_python: str,
                                                                       tmp_path: Path) -> None:
    native = _serve_and_chat(remote_7b, "native", sys.executable, tmp_path / "native")
    remote = _serve_and_chat(remote_7b, "remote-code", legacy_python, tmp_path / "remote-code")
    assert native == remote
    assert native == [reply for _, reply in ASKS]


# ---------------------------------------------------------------- the repo check


def _repo_check():
    from xlab_chat.model import check

    return check


def test_repo_check_passes_the_7b_layout(remote_7b: str, app_modules: Path) -> None:
    repo_check = _repo_check()
    symbols = {"ok": "ok", "warn": "warn", "fail": "fail", "skip": "skip"}
    for loader in ("native", "remote-code"):
        report = repo_check.check_repo(remote_7b, "main", "cpu", loader=loader)
        status = {c.title.split()[0]: c.status for c in report.checks}
        assert all(status[str(n)] == "ok" for n in range(1, 7)), report.render()
        lines = {c.title.split()[0]: c.line(symbols) for c in report.checks}
        assert "8 shards" in lines["5"] and "model_type internlm2" in lines["2"], report.render()


def test_repo_check_names_a_missing_fast_tokenizer_file(repo_7b: Path, tmp_path: Path, app_modules: Path) -> None:
    repo_check = _repo_check()
    broken = tmp_path / "no-fast"
    shutil.copytree(repo_7b, broken)
    (broken / "tokenization_internlm2_fast.py").unlink()
    report = repo_check.check_repo(tinymodel.publish(broken, tmp_path / "no-fast.git"), "main", "cpu",
                                   loader="remote-code")
    check = next(c for c in report.checks if c.title.startswith("3 "))
    assert check.status == "fail" and "tokenization_internlm2_fast.py" in check.detail, report.render()
