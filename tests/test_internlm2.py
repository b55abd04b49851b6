"""InternLM2 runs natively as LlamaForCausalLM: same logits and greedy tokens as an independent oracle.

The oracle is the tiny checkpoint's own remote code (tests/internlm2_fixture.py), a separately written
InternLM2 forward pass loaded with trust_remote_code; the native path must run no code from the folder.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import internlm2_fixture as fx
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

VARIANTS = {
    "plain": {},
    # max_position_embeddings 32: the long prompt and the 32 generated tokens cross it, so NTK scaling kicks in
    "dynamic": {"rope_scaling": {"type": "dynamic", "factor": 2.0}, "max_position_embeddings": 32},
    "sharded-safetensors": {"shards": 3},
    "sharded-bin": {"fmt": "bin", "shards": 3},
    "bias": {"bias": True, "rope_theta": 1e6},
}
PROMPTS = [
    "你好",
    "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n请你介绍一下你自己 and say hi in English 😀<|im_end|>\n<|im_start|>assistant\n",
    "the quick brown fox jumps over 懒狗 " * 4,  # about 60 tokens: past max_position_embeddings=32
]


@pytest.fixture(scope="module")
def internlm2(app_modules: Path):
    from xlab_chat.engines import internlm2 as module

    return module


@pytest.fixture(scope="module", params=list(VARIANTS))
def pair(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, internlm2):
    """(folder, oracle, native) for one checkpoint variant."""
    folder = fx.build_internlm2(tmp_path_factory.mktemp(request.param) / "model", **VARIANTS[request.param])
    oracle = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()
    native = internlm2.load_internlm2_as_llama(folder, torch.float32, "cpu")
    return folder, oracle, native


def _ids(internlm2, folder: Path, text: str) -> torch.Tensor:
    return torch.tensor([internlm2.native_tokenizer(folder)(text)["input_ids"]])


def test_native_model_is_transformers_llama(pair) -> None:
    _, oracle, native = pair
    assert type(native) is LlamaForCausalLM
    assert type(oracle).__module__.startswith("transformers_modules")  # the oracle really is the remote code
    assert all(p.dtype == torch.float32 and not p.is_meta for p in native.parameters())


def test_logits_match_oracle(pair, internlm2) -> None:
    folder, oracle, native = pair
    lengths = []
    for text in PROMPTS:  # shortest first: dynamic RoPE caches the longest length seen
        ids = _ids(internlm2, folder, text)
        lengths.append(ids.shape[1])
        with torch.no_grad():
            expected, actual = oracle(ids).logits, native(ids).logits
        assert expected.std() > 1.0  # non-trivial logits, so a wrong mapping cannot hide
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    assert max(lengths) > 32


@pytest.fixture(scope="module")
def dynamic_pair(tmp_path_factory: pytest.TempPathFactory, internlm2):
    """(folder, oracle, native) for the checkpoint with dynamic NTK RoPE scaling."""
    folder = fx.build_internlm2(tmp_path_factory.mktemp("dynamic-only") / "model", **VARIANTS["dynamic"])
    oracle = AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()
    return folder, oracle, internlm2.load_internlm2_as_llama(folder, torch.float32, "cpu")


def test_dynamic_scaling_really_applies(dynamic_pair, internlm2) -> None:
    folder, oracle, native = dynamic_pair
    ids = _ids(internlm2, folder, PROMPTS[-1])
    with torch.no_grad():
        scaled = oracle(ids).logits
        oracle.config.internlm2_rope = None
        try:
            unscaled = oracle(ids).logits
        finally:
            oracle.config.internlm2_rope = VARIANTS["dynamic"]["rope_scaling"]
        native_logits = native(ids).logits
    assert (scaled - unscaled).abs().max() > 1e-2
    torch.testing.assert_close(native_logits, scaled, atol=1e-5, rtol=0)


def test_greedy_tokens_match_oracle(pair, internlm2) -> None:
    """About 25 prompt tokens + 32 new ones: the dynamic variant crosses max_position_embeddings mid-reply."""
    folder, oracle, native = pair
    ids = _ids(internlm2, folder, PROMPTS[2])
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                   pad_token_id=2)
    expected = oracle.generate(ids, **options)[0, ids.shape[1]:].tolist()
    internlm2.reset_dynamic_rope(native)  # earlier tests ran longer sequences through the same model
    actual = native.generate(ids, **options)[0, ids.shape[1]:].tolist()
    assert len(expected) == 32 and len(set(expected)) > 4  # varied text, not one token repeated
    assert actual == expected


def test_stop_ids_come_from_generation_config(pair) -> None:
    folder, _, native = pair
    assert native.generation_config.eos_token_id == [2, fx.tinymodel_im_end_id(folder)]


def test_dynamic_rope_reset(pair, internlm2) -> None:
    folder, _, native = pair
    rotary = native.model.rotary_emb
    internlm2.reset_dynamic_rope(native)  # earlier tests ran long prompts through this model
    original = rotary.inv_freq.clone()
    with torch.no_grad():
        native(_ids(internlm2, folder, PROMPTS[-1]))  # longer than max_position_embeddings=32
    grown = not torch.equal(rotary.inv_freq, original)
    assert grown == bool(json.loads((folder / "config.json").read_text())["rope_scaling"])
    internlm2.reset_dynamic_rope(native)
    assert torch.equal(rotary.inv_freq, original) and rotary.max_seq_len_cached == rotary.original_max_seq_len


def test_bfloat16_load(tmp_path: Path, internlm2) -> None:
    folder = fx.build_internlm2(tmp_path / "model", dtype="float32")
    model = internlm2.load_internlm2_as_llama(folder, torch.bfloat16, "cpu")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32  # RoPE frequencies stay fp32, as in HF
    reference = internlm2.load_internlm2_as_llama(folder, torch.float32, "cpu")
    ids = _ids(internlm2, folder, PROMPTS[1])
    with torch.no_grad():
        low, high = model(ids).logits.float(), reference(ids).logits
    assert (low.argmax(-1) == high.argmax(-1)).float().mean() > 0.8


# --- no remote code -----------------------------------------------------------------------------------------

PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, sys.argv[1])
    from xlab_chat.engines import internlm2
    folder, marker = Path(sys.argv[2]), Path(sys.argv[3])
    model = internlm2.load_internlm2_as_llama(folder, torch.float32, "cpu")
    tokenizer = internlm2.native_tokenizer(folder)
    ids = torch.tensor([tokenizer("你好")["input_ids"]])
    model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    foreign = sorted(name for name, module in sys.modules.items()
                     if "internlm2" in name.lower() and name != "xlab_chat.engines.internlm2"
                     or str(getattr(module, "__file__", "") or "").startswith(str(folder)))
    native = {"marker": marker.exists(), "modules": foreign}
    from transformers import AutoModelForCausalLM
    AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True)  # positive control
    print(json.dumps({"native": native, "remote_marker": marker.exists()}))
""")


def test_native_path_imports_nothing_from_the_model_folder(tmp_path: Path, app_modules: Path) -> None:
    folder = fx.build_internlm2(tmp_path / "model")
    marker = tmp_path / "imported.txt"
    for name in ("configuration_internlm2.py", "modeling_internlm2.py"):
        source = (folder / name).read_text(encoding="utf-8")
        (folder / name).write_text(f"open({str(marker)!r}, 'a').write(__name__ + '\\n')\n" + source, encoding="utf-8")
    env = {**os.environ, "HF_MODULES_CACHE": str(tmp_path / "hf-modules"), "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", PROBE, str(app_modules), str(folder), str(marker)],
                          capture_output=True, text=True, env=env, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["native"] == {"marker": False, "modules": []}
    assert result["remote_marker"]  # the marker does fire when remote code is imported


# --- errors ---------------------------------------------------------------------------------------------------

def test_unknown_architecture_names_remote_code_loader(internlm2) -> None:
    with pytest.raises(ValueError, match="loader=remote-code"):
        internlm2.check_supported({"model_type": "made_up_lm", "architectures": ["MadeUpForCausalLM"]})
    internlm2.check_supported({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})
    internlm2.check_supported({"model_type": "internlm2", "architectures": ["InternLM2ForCausalLM"]})
    assert internlm2.is_internlm2({"architectures": ["InternLM2ForCausalLM"]})
    assert not internlm2.is_internlm2({"model_type": "llama", "architectures": ["LlamaForCausalLM"]})


def test_unsupported_rope_scaling_names_remote_code_loader(internlm2) -> None:
    config = json.loads(json.dumps(fx_config()))
    config["rope_scaling"] = {"type": "yarn", "factor": 4.0}
    with pytest.raises(ValueError, match="loader=remote-code"):
        internlm2.llama_config(config)


def fx_config() -> dict:
    return {"model_type": "internlm2", "vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "rope_theta": 1e6,
            "rope_scaling": None, "max_position_embeddings": 64}


def test_llama_config_reads_old_and_new_rope_spellings(internlm2) -> None:
    for scaling in ({"type": "dynamic", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}):
        llama = internlm2.llama_config({**fx_config(), "rope_scaling": scaling})
        rope = getattr(llama, "rope_parameters", None) or {**llama.rope_scaling, "rope_theta": llama.rope_theta}
        assert (rope["rope_type"], rope["factor"], rope["rope_theta"]) == ("dynamic", 2.0, 1e6)
    assert llama.tie_word_embeddings is False and llama.head_dim == 16


def test_missing_weight_is_a_clear_error(tmp_path: Path, internlm2) -> None:
    from safetensors.torch import load_file, save_file

    folder = fx.build_internlm2(tmp_path / "model")
    weights = load_file(str(folder / "model.safetensors"))
    del weights["model.layers.1.feed_forward.w2.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.down_proj\.weight"):
        internlm2.load_internlm2_as_llama(folder, torch.float32, "cpu")


def test_unexpected_weight_is_a_clear_error(internlm2) -> None:
    with pytest.raises(ValueError, match="model.layers.0.attention.extra.weight"):
        internlm2.convert_state_dict({"model.layers.0.attention.extra.weight": torch.zeros(1)}, fx_config())


def test_wqkv_split_follows_kv_groups(internlm2) -> None:
    """Rows are [q0 q1 k v] per kv head; label each row by what it is and check where it lands."""
    config = fx_config()  # 4 heads, 2 kv heads, head_dim 16
    labels = []
    for kv in range(2):
        labels += [100 * (2 * kv + j) for j in range(2) for _ in range(16)]  # query heads 2kv, 2kv+1
        labels += [-1 - kv] * 16 + [-10 - kv] * 16  # key, value
    wqkv = torch.tensor(labels, dtype=torch.float32)[:, None].repeat(1, 64)
    out = internlm2.convert_state_dict({"model.layers.0.attention.wqkv.weight": wqkv}, config)
    q, k, v = (out[f"model.layers.0.self_attn.{p}_proj.weight"][:, 0] for p in "qkv")
    assert q.tolist() == [100.0 * h for h in range(4) for _ in range(16)]
    assert k.tolist() == [-1.0] * 16 + [-2.0] * 16 and v.tolist() == [-10.0] * 16 + [-11.0] * 16


# --- memory -------------------------------------------------------------------------------------------------

MEMORY_PROBE = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    import safetensors.torch  # noqa: F401  (everything imported before the baseline)
    import transformers
    import transformers.models.llama.modeling_llama  # noqa: F401
    sys.path.insert(0, sys.argv[1])
    from xlab_chat.engines import internlm2
    folder, mode = Path(sys.argv[2]), sys.argv[3]
    def status(key):
        line = next(x for x in open("/proc/self/status") if x.startswith(key + ":"))
        return int(line.split()[1]) * 1024
    try:  # reset the high-water mark so only the load counts ("5": Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        pass
    before = status("VmRSS")
    if mode == "native":
        model = internlm2.load_internlm2_as_llama(folder, torch.float32, "cpu")
    else:  # the naive way, as a control: a full model, then a full converted state dict
        from safetensors.torch import load_file
        config = json.loads((folder / "config.json").read_text())
        model = transformers.LlamaForCausalLM(internlm2.llama_config(config))
        state = {}
        for path in sorted(folder.glob("*.safetensors")):
            state.update(internlm2.convert_state_dict(load_file(str(path)), config))
        model.load_state_dict(state)
    peak = status("VmHWM")  # not ru_maxrss: Linux carries that over from the parent across fork + exec
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"delta": peak - before, "weights": weights}))
""")


@pytest.fixture(scope="module", params=[4, 1], ids=["4-shards", "1-shard"])
def big_checkpoint(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """About 75 MB of fp32 weights in safetensors shards; one shard is where a memory map would double the peak."""
    return fx.build_internlm2(tmp_path_factory.mktemp("big") / "model", hidden=1024, layers=2, heads=8,
                              kv_heads=4, intermediate=2048, shards=request.param)


def _peak_ratio(app_modules: Path, folder: Path, mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(app_modules), str(folder), mode],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["weights"] > 50e6
    return result["delta"] / result["weights"]


def test_native_load_keeps_about_one_copy_of_the_weights(big_checkpoint: Path, app_modules: Path) -> None:
    native = _peak_ratio(app_modules, big_checkpoint, "native")
    naive = _peak_ratio(app_modules, big_checkpoint, "naive")
    assert native < 1.3, f"native load peaked at {native:.2f}x the weights"
    assert naive > 1.6, f"the naive control peaked at only {naive:.2f}x: the measurement cannot tell them apart"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_shard_reader_gives_what_safetensors_gives(internlm2, tmp_path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import load_file, save_file

    stored = {
        "f32": torch.randn(3, 5), "bf16": torch.randn(7).to(torch.bfloat16), "f16": torch.randn(2, 2).half(),
        "i64": torch.arange(6).reshape(2, 3), "bool": torch.tensor([True, False, True]), "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 4),
    }
    path = tmp_path / "model.safetensors"
    save_file(stored, str(path), metadata={"format": "pt"})
    read = internlm2._read_shard(path, dtype)
    reference = load_file(str(path))
    assert sorted(read) == sorted(reference)
    for name, tensor in reference.items():
        expected = tensor.to(dtype) if tensor.is_floating_point() else tensor
        assert read[name].dtype == expected.dtype and read[name].shape == expected.shape, name
        assert torch.equal(read[name], expected), name


def test_truncated_or_foreign_shard_is_refused_with_its_fix(internlm2, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "model.safetensors"
    save_file({"w": torch.randn(64, 64)}, str(path))
    whole = path.read_bytes()
    path.write_bytes(whole[:-100])
    with pytest.raises(ValueError, match="truncated; delete the model folder"):
        internlm2._read_shard(path, torch.float32)
    path.write_bytes(b"<html>rate limited</html>")  # what a proxy may serve in place of the file
    with pytest.raises(ValueError, match="not a readable safetensors file; delete the model folder"):
        internlm2._read_shard(path, torch.float32)


# --- tokenizer ----------------------------------------------------------------------------------------------

TOKENIZER_SAMPLES = [
    "你好！我是小助手，很高兴认识你。",
    "Hello! I am a small assistant. How can I help you?",
    "我会说中文和 English，mixed 文本 123。",
    "<|im_start|>system\nYou are 书生·浦语<|im_end|>\n<|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n",
    " leading space",
    "   three leading spaces and  double  gaps ",
    "emoji 😀🎉 and rare 龘 chars ©",
    "\n\nnew\nlines\tand tabs\n",
    "<s>literal bos</s> inside text",
    "",
]
SPECIALS = ["<|im_start|>", "<|im_end|>", "<s>", "</s>", "<unk>"]
NORMALIZERS = {
    "as-trained": None,  # nmt_nfkc, dummy prefix, extra whitespace removed
    "identity-dummy-prefix": {"name": "identity", "add_dummy_prefix": True, "remove_extra_whitespaces": False},
    "identity-no-prefix": {"name": "identity", "add_dummy_prefix": False, "remove_extra_whitespaces": False},
}


@pytest.fixture(scope="module", params=list(NORMALIZERS))
def tokenizer_folder(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from sentencepiece import sentencepiece_model_pb2

    folder = tmp_path_factory.mktemp("tok-" + request.param)
    fx._write_tokenizer(folder)
    spec = NORMALIZERS[request.param]
    if spec:
        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((folder / "tokenizer.model").read_bytes())
        proto.normalizer_spec.name = spec["name"]
        proto.normalizer_spec.precompiled_charsmap = b""
        proto.normalizer_spec.add_dummy_prefix = spec["add_dummy_prefix"]
        proto.normalizer_spec.remove_extra_whitespaces = spec["remove_extra_whitespaces"]
        (folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    return folder


def _reference_ids(folder: Path, text: str) -> list:
    """InternLM2Tokenizer's encoding: bos, then sentencepiece on each stretch between special tokens."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    ids = [sp.bos_id()]
    for chunk in re.split("(" + "|".join(map(re.escape, SPECIALS)) + ")", text):
        if chunk in SPECIALS:
            ids.append(sp.piece_to_id(chunk))
        elif chunk:
            ids += sp.encode(chunk)
    return ids


def test_native_tokenizer_matches_sentencepiece(tokenizer_folder: Path, internlm2) -> None:
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_folder / "tokenizer.model"))
    tokenizer = internlm2.native_tokenizer(tokenizer_folder)
    special_ids = {sp.piece_to_id(t) for t in SPECIALS}
    for text in TOKENIZER_SAMPLES:
        ids = tokenizer(text)["input_ids"]
        assert ids == _reference_ids(tokenizer_folder, text), text
        plain = [i for i in ids if i not in special_ids]
        assert tokenizer.decode(ids, skip_special_tokens=True) == sp.decode(plain), text
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == sp.piece_to_id("<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)


def test_native_tokenizer_keeps_chat_template(tokenizer_folder: Path, internlm2) -> None:
    tokenizer = internlm2.native_tokenizer(tokenizer_folder)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "你好"}], tokenize=False,
                                         add_generation_prompt=True)
    assert text == "<s><|im_start|>user\n你好<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == _reference_ids(tokenizer_folder, text)[1:]
