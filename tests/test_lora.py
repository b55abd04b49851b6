"""LoRA merge at load time == peft's own merge_and_unload, on a tiny InternLM2 with an independent oracle.

Oracle: the checkpoint's remote code (tests/internlm2_fixture.py) loaded with trust_remote_code, the adapter
loaded from the saved folder by peft (PeftModel.from_pretrained) and merged by peft. Ours: the app's native
loader (engines/internlm2.load_internlm2_as_llama) merging each shard as it is read (engines/lora.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import internlm2_fixture as fx
import pytest
from conftest import TEMPLATE_APP

sys.path.insert(0, str(TEMPLATE_APP))

import torch  # noqa: E402
from peft import IA3Config, LoraConfig, PeftModel, get_peft_model  # noqa: E402
from torch import nn  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402
from xlab_chat.engines import internlm2  # noqa: E402
from xlab_chat.engines import lora as lm  # noqa: E402
from xlab_chat.model import adapter as adapter_check  # noqa: E402

_READ_SHARD = internlm2._read_shard  # the loader's own, before any test patches it
ALL_BUT_OUTPUT = ["wqkv", "wo", "w1", "w2", "w3"]
PROMPTS = [
    "你好",
    "<|im_start|>user\nHello, who are you?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\n请你介绍一下你自己 and say hi in English 😀<|im_end|>\n<|im_start|>assistant\n",
]
# name: (base checkpoint options, LoraConfig options)
VARIANTS = {
    # XTuner's InternLM2 QLoRA recipe: r=64, alpha=16, dropout 0.1, target_modules=None -> find_all_linear_names
    "xtuner": ({"shards": 3}, dict(r=64, lora_alpha=16, lora_dropout=0.1, bias="none", target_modules="XTUNER")),
    "brief": ({"fmt": "bin", "shards": 2}, dict(r=8, lora_alpha=16, lora_dropout=0.1, bias="none",
                                                target_modules=ALL_BUT_OUTPUT)),
    "bias-all": ({"bias": True, "shards": 2}, dict(r=8, lora_alpha=16, bias="all", target_modules=ALL_BUT_OUTPUT)),
    # lora_bias needs a base bias to merge into: in InternLM2 (bias=true) only wqkv and wo have one
    "lora-bias": ({"bias": True}, dict(r=8, lora_alpha=16, bias="lora_only", lora_bias=True,
                                       target_modules=["wqkv", "wo"])),
    "patterns": ({"kv_heads": 1}, dict(r=8, lora_alpha=16, use_rslora=True, target_modules=[*ALL_BUT_OUTPUT,
                                                                                            "tok_embeddings"],
                                       rank_pattern={"wo": 4, r"layers\.1\.feed_forward\.w2": 2},
                                       alpha_pattern={"w1": 32}, modules_to_save=["output"])),
}


def xtuner_find_all_linear_names(model: nn.Module) -> list:
    """XTuner's xtuner/model/utils.py find_all_linear_names, verbatim in behaviour: drops lm_head and
    output_layer only, so InternLM2's head (named ``output``) IS targeted."""
    names = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            parts = name.split(".")
            names.add(parts[0] if len(parts) == 1 else parts[-1])
    names.discard("lm_head")
    names.discard("output_layer")
    return sorted(names)


def _oracle_base(folder: Path) -> nn.Module:
    return AutoModelForCausalLM.from_pretrained(str(folder), trust_remote_code=True, dtype=torch.float32).eval()


def _randomize(peft_model: nn.Module, seed: int, biases: bool) -> None:
    """Trained-looking adapter: every LoRA tensor (and saved module / bias) random, nothing zero. Each update
    scale * B @ A gets about half the spread of the base weight it changes, whatever r and alpha are."""
    gen = torch.Generator().manual_seed(seed)

    def normal(like: torch.Tensor, std: float) -> torch.Tensor:
        return torch.randn(like.shape, generator=gen) * std

    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:  # Linear LoRA
                s, r = module.scaling["default"], module.r["default"]
                a, b = module.lora_A["default"], module.lora_B["default"]
                a.weight.copy_(normal(a.weight, 1 / a.weight.shape[1] ** 0.5))
                b.weight.copy_(normal(b.weight, 0.5 / (s * r ** 0.5)))
                if b.bias is not None:
                    b.bias.copy_(normal(b.bias, 0.1 / s))
            if hasattr(module, "lora_embedding_A") and "default" in module.lora_embedding_A:
                s, r = module.scaling["default"], module.r["default"]
                emb_a, emb_b = module.lora_embedding_A["default"], module.lora_embedding_B["default"]
                emb_a.copy_(normal(emb_a, 1.0))
                emb_b.copy_(normal(emb_b, 0.5 / (s * r ** 0.5)))
        for name, param in peft_model.named_parameters():
            if "modules_to_save" in name:
                param.add_(normal(param, 0.5 * float(param.std())))
            elif biases and name.endswith(".bias") and "lora_" not in name:
                param.add_(normal(param, 0.1))


def make_adapter(base: Path, out: Path, options: dict, safe: bool, seed: int = 1) -> Path:
    model = _oracle_base(base)
    options = dict(options)
    if options.get("target_modules") == "XTUNER":
        options["target_modules"] = xtuner_find_all_linear_names(model)
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
    _randomize(model, seed, biases=options.get("bias", "none") != "none")
    model.save_pretrained(str(out), safe_serialization=safe)
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return {name: fx.build_internlm2(tmp_path_factory.mktemp(f"base-{name}") / "model", **base)
            for name, (base, _) in VARIANTS.items()}


def oracle_model(base: Path, adapter: Path) -> nn.Module:
    return PeftModel.from_pretrained(_oracle_base(base), str(adapter)).merge_and_unload().eval()


def native_with_adapter(base: Path, adapter_folder: Path, monkeypatch: pytest.MonkeyPatch):
    """The app's native loader with the adapter merged shard by shard; also returns the applied record."""
    config = json.loads((base / "config.json").read_text())
    adapter = lm.load_adapter(adapter_folder, config)
    applied: dict = {}
    merge_into = lm.merge_into

    def recording_merge(tensors, adapter):
        done = merge_into(tensors, adapter)
        applied.update(done)
        return done

    monkeypatch.setattr(lm, "merge_into", recording_merge)  # the loader's own merge, recorded, not replaced
    model = internlm2.load_internlm2_as_llama(base, torch.float32, "cpu", adapter=adapter)
    return model, adapter, applied


def _ids(folder: Path, text: str) -> torch.Tensor:
    return torch.tensor([internlm2.native_tokenizer(folder)(text)["input_ids"]])


def _compare(base: Path, oracle: nn.Module, ours: nn.Module) -> None:
    plain = _oracle_base(base)
    for text in PROMPTS:
        ids = _ids(base, text)
        with torch.no_grad():
            expected, actual, before = oracle(ids).logits, ours(ids).logits, plain(ids).logits
        assert expected.std() > 1.0
        assert (expected - before).abs().max() > 0.5  # the adapter really changes the model
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)
    ids = _ids(base, PROMPTS[2])
    options = dict(attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=32, min_new_tokens=32,
                   pad_token_id=2)
    expected = oracle.generate(ids, **options)[0, ids.shape[1]:].tolist()
    actual = ours.generate(ids, **options)[0, ids.shape[1]:].tolist()
    assert len(expected) == 32 and len(set(expected)) > 4
    assert actual == expected


def test_xtuner_targets_every_linear_including_output(bases: dict) -> None:
    """XTuner leaves target_modules None and fills it with find_all_linear_names: on InternLM2 the head is
    called ``output`` (not lm_head/output_layer), so it is a LoRA target too."""
    assert xtuner_find_all_linear_names(_oracle_base(bases["xtuner"])) == ["output", "w1", "w2", "w3", "wo", "wqkv"]


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_merge_matches_peft(variant: str, fmt: str, bases: dict, tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    base = bases[variant]
    folder = make_adapter(base, tmp_path / "adapter", VARIANTS[variant][1], safe=fmt == "safetensors")
    weights = {"safetensors": "adapter_model.safetensors", "bin": "adapter_model.bin"}[fmt]
    assert sorted(p.name for p in folder.iterdir()) == sorted(["adapter_config.json", "README.md", weights])
    ours, adapter, applied = native_with_adapter(base, folder, monkeypatch)
    oracle = oracle_model(base, folder)
    _compare(base, oracle, ours)
    assert set(applied) == set(adapter.updates)
    # before the rename/split, our merged InternLM2 tensors are bit-identical to peft's merge_and_unload
    merged, expected = {}, oracle.state_dict()
    for path in internlm2._shard_files(base):
        part = _READ_SHARD(path, torch.float32)
        lm.merge_into(part, adapter)
        merged.update(part)
    assert merged.keys() == expected.keys()
    assert all(torch.equal(merged[k], expected[k]) for k in merged)
    if variant == "xtuner":
        assert "output.weight" in applied  # LoRA on the head, renamed to lm_head afterwards
    if variant == "bias-all":
        assert applied["model.layers.0.attention.wqkv.bias"] == "replaced"
    if variant == "lora-bias":
        assert "lora_bias" in applied["model.layers.1.attention.wo.bias"]
    if variant == "patterns":
        assert applied["output.weight"] == "replaced" and applied["model.tok_embeddings.weight"] == "lora"
        assert adapter.updates["model.layers.0.attention.wo.weight"].lora_A.shape[0] == 4
        assert adapter.updates["model.layers.1.feed_forward.w1.weight"].scale == pytest.approx(32 / 8 ** 0.5)


def test_saved_key_names(bases: dict, tmp_path: Path) -> None:
    """What peft writes: no adapter name; base_layer.bias for bias='all'; whole module for modules_to_save."""
    opts = dict(VARIANTS["patterns"][1], bias="all")
    folder = make_adapter(bases["bias-all"], tmp_path / "a", opts, safe=True)
    keys = set(adapter_check.read_safetensors_shapes(folder / "adapter_model.safetensors"))
    p = "base_model.model.model.layers.0."
    assert {p + "attention.wqkv.lora_A.weight", p + "attention.wqkv.lora_B.weight",
            p + "attention.wqkv.base_layer.bias", "base_model.model.model.tok_embeddings.lora_embedding_A",
            "base_model.model.output.weight"} <= keys
    assert not any(".default" in k for k in keys)


def test_fan_in_fan_out_flag_is_ignored_like_peft(bases: dict, tmp_path: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    base = bases["brief"]
    folder = make_adapter(base, tmp_path / "a", VARIANTS["brief"][1], safe=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, fan_in_fan_out=True)))
    ours, adapter, _ = native_with_adapter(base, folder, monkeypatch)
    assert adapter.notes and "fan_in_fan_out" in adapter.notes[0]
    with pytest.warns(UserWarning, match="fan_in_fan_out"):
        oracle = oracle_model(base, folder)
    _compare(base, oracle, ours)


# ---------------------------------------------------------------- rejections, each with its way out


def test_dora_is_rejected(bases: dict, tmp_path: Path) -> None:
    folder = make_adapter(bases["brief"], tmp_path / "a", dict(VARIANTS["brief"][1], use_dora=True), safe=True)
    with pytest.raises(lm.AdapterError, match=r"DoRA.*merge_and_unload"):
        lm.read_adapter_config(folder)


def test_other_peft_type_is_rejected(bases: dict, tmp_path: Path) -> None:
    model = get_peft_model(_oracle_base(bases["brief"]), IA3Config(task_type="CAUSAL_LM", target_modules=["wqkv", "w2"],
                                                                   feedforward_modules=["w2"]))
    model.save_pretrained(str(tmp_path / "ia3"))
    with pytest.raises(lm.AdapterError, match=r"peft_type='IA3'.*only LoRA"):
        lm.read_adapter_config(tmp_path / "ia3")


def test_adapter_for_another_hidden_size_is_rejected(bases: dict, tmp_path: Path) -> None:
    other = fx.build_internlm2(tmp_path / "small", hidden=32)
    folder = make_adapter(other, tmp_path / "a", VARIANTS["brief"][1], safe=True)
    config = json.loads((bases["brief"] / "config.json").read_text())
    problems = lm.check_shapes(lm.read_adapter_weights(folder), config)
    assert problems and all("hidden_size=64" in p for p in problems)
    with pytest.raises(lm.AdapterError, match=r"does not fit the base model"):
        lm.load_adapter(folder, config)
    # the stdlib-only check sees the same from the safetensors header, without importing torch
    code = ("import json, sys; from pathlib import Path; sys.path.insert(0, sys.argv[1]);"
            " from xlab_chat.model import adapter as c;"
            " folder = Path(sys.argv[2]);"
            " p = c.check_adapter_shapes(c.read_safetensors_shapes(folder / 'adapter_model.safetensors'),"
            " json.load(open(sys.argv[3])), c.read_adapter_config(folder));"
            " assert 'torch' not in sys.modules; print(len(p))")
    out = subprocess.run([sys.executable, "-c", code, str(TEMPLATE_APP), str(folder),
                          str(bases["brief"] / "config.json")],
                         capture_output=True, text=True, check=True)
    assert int(out.stdout) == len(problems)


def test_bias_all_adapter_on_a_bias_free_base_is_rejected(bases: dict, tmp_path: Path) -> None:
    """bias='all' saves the trained biases; the official InternLM2 has none, so such biases cannot belong to it."""
    folder = make_adapter(bases["bias-all"], tmp_path / "a", VARIANTS["bias-all"][1], safe=True)
    config = json.loads((bases["brief"] / "config.json").read_text())  # bias: false
    problems = lm.check_shapes(lm.read_adapter_weights(folder), config)
    assert problems and all("has no bias" in p for p in problems)
    adapter = lm.prepare_adapter(lm.read_adapter_config(folder), lm.read_adapter_weights(folder))
    tensors = _READ_SHARD(next(bases["brief"].glob("*.bin")), torch.float32)
    with pytest.raises(lm.AdapterError, match="found no base weight"):
        lm.assert_all_applied(adapter, lm.merge_into(tensors, adapter))


def test_lora_bias_on_a_bias_free_layer_is_rejected(bases: dict, tmp_path: Path) -> None:
    """peft trains it (with a warning) but cannot merge it either: there is no base bias to add it to."""
    folder = make_adapter(bases["bias-all"], tmp_path / "a", dict(VARIANTS["lora-bias"][1], target_modules=["w2"]),
                          safe=True)
    config = json.loads((bases["bias-all"] / "config.json").read_text())
    with pytest.raises(lm.AdapterError, match=r"feed_forward.w2.lora_B.bias: the base model's .* has no bias"):
        lm.load_adapter(folder, config)


def test_more_layers_or_vocab_than_the_base_is_rejected(bases: dict) -> None:
    config = json.loads((bases["brief"] / "config.json").read_text())
    shapes = {"base_model.model.model.layers.7.attention.wo.lora_A.weight": (8, 64),
              "base_model.model.model.layers.7.attention.wo.lora_B.weight": (64, 8),
              "base_model.model.output.weight": (config["vocab_size"] + 64, 64)}
    problems = adapter_check.check_adapter_shapes(shapes, config)
    assert any("layer 7" in p and "only 2 layers" in p for p in problems)
    assert any("vocabulary" in p for p in problems)


def test_rank_disagreeing_with_config_is_rejected(bases: dict, tmp_path: Path) -> None:
    folder = make_adapter(bases["brief"], tmp_path / "a", VARIANTS["brief"][1], safe=True)
    cfg = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps(dict(cfg, r=16)))
    with pytest.raises(lm.AdapterError, match=r"rank 8 but adapter_config.json says r=16"):
        lm.load_adapter(folder, json.loads((bases["brief"] / "config.json").read_text()))


@pytest.mark.parametrize("change, message", [
    ({"peft_type": "LOHA"}, "only LoRA"),
    ({"use_dora": True}, "DoRA"),
    ({"init_lora_weights": "pissa_niter_4"}, "path_initial_model_for_weight_conversion"),
    ({"init_lora_weights": "olora"}, "changed the base weights"),
    ({"loftq_config": {"loftq_bits": 4}}, "LoftQ"),
    ({"layer_replication": [[0, 2]]}, "layer_replication"),
    ({"some_future_option": {"x": 1}}, "some_future_option"),
    ({"bias": "some"}, "bias='some'"),
    ({"r": 0}, "r <= 0"),
])
def test_config_rejections(change: dict, message: str) -> None:
    base = {"peft_type": "LORA", "r": 8, "lora_alpha": 16, "target_modules": ["wqkv"], "bias": "none"}
    with pytest.raises(lm.AdapterError, match=message):
        lm.parse_adapter_config(dict(base, **change))


def test_config_reads_xtuner_values() -> None:
    cfg = lm.parse_adapter_config({"peft_type": "LORA", "r": 64, "lora_alpha": 16, "lora_dropout": 0.1,
                                   "bias": "none", "task_type": "CAUSAL_LM", "fan_in_fan_out": False,
                                   "target_modules": ["w1", "w2", "w3", "wo", "wqkv", "output"],
                                   "base_model_name_or_path": "internlm/internlm2-chat-7b", "loftq_config": {},
                                   "use_rslora": False, "rank_pattern": {}, "alpha_pattern": {}})
    assert cfg.scale("model.layers.0.attention.wqkv") == 0.25
    assert cfg.target_modules and "output" in cfg.target_modules


def test_missing_files_name_the_converter(tmp_path: Path) -> None:
    with pytest.raises(lm.AdapterError, match="xtuner convert pth_to_hf"):
        lm.read_adapter_config(tmp_path)
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 8}))
    with pytest.raises(lm.AdapterError, match="adapter_model.safetensors nor adapter_model.bin"):
        lm.read_adapter_weights(tmp_path)


def test_wqkv_merge_then_split_equals_split_then_merge(bases: dict) -> None:
    """The comment's identity, numerically, with the app's own splitter and GQA (2 kv heads)."""
    config = json.loads((bases["brief"] / "config.json").read_text())
    gen = torch.Generator().manual_seed(0)
    rows = (config["num_attention_heads"] + 2 * config["num_key_value_heads"]) * 16
    w, b, a = (torch.randn(s, generator=gen, dtype=torch.float64) for s in ((rows, 64), (rows, 8), (8, 64)))
    merged = internlm2._split_wqkv(w + 0.5 * b @ a, config)
    for whole, w_part, b_part in zip(merged, internlm2._split_wqkv(w, config), internlm2._split_wqkv(b, config)):
        torch.testing.assert_close(whole, w_part + 0.5 * b_part @ a)

