"""Check a peft LoRA adapter (e.g. from ``xtuner convert pth_to_hf``) against an InternLM2 base, stdlib only.

No torch import: a repo check can run this on ``adapter_config.json``, the base ``config.json`` and the tensor
shapes read from a safetensors header. ``engines/lora.py`` builds on the same rules, so the two never disagree.

What peft (0.21) writes, and older versions wrote the same way: every key starts ``base_model.model.``, then the
base model's module path, then
  ``lora_A.weight`` (r, in) / ``lora_B.weight`` (out, r) / ``lora_B.bias`` (out,) when ``lora_bias=True``,
  ``lora_embedding_A`` (r, vocab) / ``lora_embedding_B`` (hidden, r) for an Embedding target,
  ``base_layer.bias`` (or plain ``bias`` before peft 0.7) for ``bias="all"``/``"lora_only"``: the trained bias,
  ``weight``/``bias`` for ``modules_to_save`` (and resized embeddings): the whole trained tensor.
The adapter name ("default") is not in saved keys.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

# Where the official InternLM2 chat bases live (OpenXLab's model center first: most users deploy there).
OFFICIAL_BASES = ("https://code.openxlab.org.cn/OpenLMLab/internlm2-chat-1.8b.git (InternLM2-chat-1.8B),"
                  " https://code.openxlab.org.cn/OpenLMLab/internlm2-chat-7b.git (7B), or"
                  " https://huggingface.co/internlm/internlm2-chat-1_8b on Hugging Face")
PREFIX = "base_model.model."
CONFIG_NAME = "adapter_config.json"
WEIGHT_NAMES = ("adapter_model.safetensors", "adapter_model.bin")
# Kinds of adapter tensors, keyed by the suffix peft gives them.
_SUFFIXES = (
    (".lora_A.weight", "lora_A"), (".lora_B.weight", "lora_B"), (".lora_B.bias", "lora_B_bias"),
    (".lora_embedding_A", "emb_A"), (".lora_embedding_B", "emb_B"),
    (".base_layer.weight", "weight"), (".base_layer.bias", "bias"),
    (".modules_to_save.weight", "weight"), (".modules_to_save.bias", "bias"),
    (".weight", "weight"), (".bias", "bias"),
)
_NAMED_LORA = re.compile(  # the same with the adapter name kept, e.g. lora_A.default.weight
    r"^(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)\.([A-Za-z0-9_\-]+)(\.weight|\.bias)?$")
_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
# init_lora_weights values that change the *base* weights at initialisation: such an adapter only works on
# that modified base unless peft converted it to plain LoRA when saving.
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
# Options that change what a merge must compute (or the model's structure): only their defaults are merged.
_MUST_BE_DEFAULT = {
    "use_dora": (False, "DoRA adapters (use_dora=true) rescale each weight column by a learned magnitude; "
                        "merge it into the base with peft (model.merge_and_unload()) and deploy the merged model, "
                        "or retrain without use_dora"),
    "layer_replication": (None, "layer_replication changes the number of layers; merge with peft and deploy the "
                                "merged model"),
    "target_parameters": (None, "target_parameters (LoRA on raw parameters such as MoE experts) is not supported; "
                                "merge with peft and deploy the merged model"),
    "trainable_token_indices": (None, "trainable_token_indices (trainable token embeddings) is not supported; "
                                      "merge with peft and deploy the merged model"),
    "alora_invocation_tokens": (None, "activated LoRA (alora_invocation_tokens) only applies after its invocation "
                                      "tokens and cannot be merged into the weights; serve it with peft instead"),
    "use_qalora": (False, "QA-LoRA (use_qalora=true) is not supported; merge with peft and deploy the merged "
                          "model"),
    "use_bdlora": (None, "use_bdlora is not supported; merge with peft and deploy the merged model"),
    "megatron_config": (None, "Megatron-parallel LoRA (megatron_config) is not supported; merge with peft first"),
}
# Options that do not affect the merge (or are checked elsewhere); anything unknown must be empty/false.
_KNOWN = {
    "peft_type", "r", "lora_alpha", "use_rslora", "fan_in_fan_out", "bias", "lora_bias", "modules_to_save",
    "target_modules", "rank_pattern", "alpha_pattern", "base_model_name_or_path", "revision", "task_type",
    "inference_mode", "auto_mapping", "peft_version", "lora_dropout", "layers_to_transform", "layers_pattern",
    "exclude_modules", "init_lora_weights", "loftq_config", "eva_config", "megatron_core", "qalora_group_size",
    "ensure_weight_tying", *_MUST_BE_DEFAULT,
}
_FIX = "re-export the adapter with `xtuner convert pth_to_hf` (or peft's save_pretrained)"


class AdapterError(ValueError):
    """The adapter cannot be merged into this base model; the message says why and what to do."""


@dataclass(frozen=True)
class AdapterConfig:
    r: int
    lora_alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    bias: str = "none"
    lora_bias: bool = False
    modules_to_save: Tuple[str, ...] = ()
    target_modules: Optional[Tuple[str, ...]] = None  # None when a str (regex) or absent
    target_regex: Optional[str] = None
    rank_pattern: Dict[str, int] = field(default_factory=dict)
    alpha_pattern: Dict[str, float] = field(default_factory=dict)
    base_model_name_or_path: Optional[str] = None

    def rank_and_alpha(self, module: str) -> Tuple[int, float]:
        """peft's per-module r and alpha: the first pattern key matching the end of the module path, as
        ``peft.utils.other.get_pattern_key`` does (``re.match(rf"(.*\\.)?({key})$", module)``)."""
        r, alpha = self.r, self.lora_alpha
        for key, value in self.rank_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                r = int(value)
                break
        for key, value in self.alpha_pattern.items():
            if re.match(rf"(.*\.)?({key})$", module):
                alpha = float(value)
                break
        return r, alpha

    def scale(self, module: str) -> float:
        """The factor peft multiplies B @ A by: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_and_alpha(module)
        return alpha / (r ** 0.5) if self.use_rslora else alpha / r


def parse_adapter_config(data: Mapping[str, object], source: str = CONFIG_NAME) -> AdapterConfig:
    """Validate an adapter_config.json's content; AdapterError names the problem and the way out."""
    if not isinstance(data, Mapping):
        raise AdapterError(f"{source} is not a JSON object; {_FIX}.")
    peft_type = str(data.get("peft_type") or "").upper()
    if peft_type != "LORA":
        raise AdapterError(f"{source} has peft_type={data.get('peft_type')!r}; only LoRA/QLoRA adapters "
                           f"(peft_type \"LORA\") can be merged at load time. Merge it with peft "
                           f"(model.merge_and_unload()) and deploy the merged model instead.")
    for key, (default, why) in _MUST_BE_DEFAULT.items():
        value = data.get(key, default)
        if value not in (default, None, False, [], {}):
            raise AdapterError(f"{source}: {key}={value!r}: {why}.")
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise AdapterError(f"{source}: init_lora_weights={init!r} changed the base weights during training, so "
                           f"this adapter does not fit the official base model. Save it again with peft's "
                           f"save_pretrained(..., path_initial_model_for_weight_conversion=...) to get a plain "
                           f"LoRA, or merge it and deploy the merged model.")
    if data.get("loftq_config"):
        raise AdapterError(f"{source}: a LoftQ adapter (loftq_config set) belongs to a LoftQ-modified base "
                           f"model, not the official one; merge it and deploy the merged model.")
    unknown = sorted(key for key, value in data.items()
                     if key not in _KNOWN and value not in (None, False, [], {}, "", 0))
    if unknown:
        shown = ", ".join(f"{key}={data[key]!r}" for key in unknown)
        raise AdapterError(f"{source} sets options this app does not know how to merge ({shown}); merge the "
                           f"adapter with peft (model.merge_and_unload()) and deploy the merged model.")
    try:
        r = int(data["r"])  # type: ignore[arg-type]
        alpha = float(data.get("lora_alpha", 8))  # type: ignore[arg-type]
        rank_pattern = {str(k): int(v) for k, v in dict(data.get("rank_pattern") or {}).items()}  # type: ignore
        alpha_pattern = {str(k): float(v) for k, v in dict(data.get("alpha_pattern") or {}).items()}  # type: ignore
    except (KeyError, TypeError, ValueError):
        raise AdapterError(f"{source} lacks a valid r / lora_alpha / rank_pattern / alpha_pattern; {_FIX}.") from None
    if r <= 0 or any(v <= 0 for v in rank_pattern.values()):
        raise AdapterError(f"{source} has a rank r <= 0; {_FIX}.")
    for pattern in [*rank_pattern, *alpha_pattern]:
        try:
            re.compile(pattern)
        except re.error:
            raise AdapterError(f"{source}: rank/alpha pattern {pattern!r} is not a valid regular expression; "
                               f"{_FIX}.") from None
    bias = str(data.get("bias") or "none")
    if bias not in ("none", "all", "lora_only"):
        raise AdapterError(f"{source} has bias={bias!r}; peft only knows \"none\", \"all\" and \"lora_only\"; {_FIX}.")
    targets = data.get("target_modules")
    modules_to_save = data.get("modules_to_save") or ()
    return AdapterConfig(
        r=r, lora_alpha=alpha, use_rslora=bool(data.get("use_rslora", False)),
        fan_in_fan_out=bool(data.get("fan_in_fan_out", False)), bias=bias, lora_bias=bool(data.get("lora_bias", False)),
        modules_to_save=tuple(str(m) for m in modules_to_save),  # type: ignore[union-attr]
        target_modules=tuple(str(t) for t in targets) if isinstance(targets, (list, tuple)) else None,
        target_regex=targets if isinstance(targets, str) else None,
        rank_pattern=rank_pattern, alpha_pattern=alpha_pattern,
        base_model_name_or_path=data.get("base_model_name_or_path"),  # type: ignore[arg-type]
    )


def read_adapter_config(folder: Path) -> AdapterConfig:
    """Read and validate ``folder/adapter_config.json``."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise AdapterError(f"{folder} has no {CONFIG_NAME}: it is not a peft/XTuner adapter folder. Convert the "
                           f"XTuner checkpoint with `xtuner convert pth_to_hf CONFIG PTH {folder}` first.")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise AdapterError(f"{path} is not readable JSON ({exc}); {_FIX}.") from None
    return parse_adapter_config(data, str(path))


def adapter_weights_file(folder: Path) -> Path:
    """adapter_model.safetensors, else adapter_model.bin (peft's own preference)."""
    for name in WEIGHT_NAMES:
        if (Path(folder) / name).is_file():
            return Path(folder) / name
    raise AdapterError(f"{folder} has neither {' nor '.join(WEIGHT_NAMES)}; {_FIX}.")


def read_safetensors_shapes(path: Path) -> Dict[str, Tuple[int, ...]]:
    """name -> shape from a safetensors header, without reading the data."""
    with open(path, "rb") as handle:
        try:
            (length,) = struct.unpack("<Q", handle.read(8))
            header = json.loads(handle.read(length))
        except (struct.error, ValueError, MemoryError, OverflowError):
            raise AdapterError(f"{Path(path).name} is not a readable safetensors file; {_FIX}.") from None
    header.pop("__metadata__", None)
    return {name: tuple(int(d) for d in info["shape"]) for name, info in header.items()}


def parse_adapter_key(key: str) -> Tuple[str, str]:
    """(base module path, kind) for a saved adapter key; kind is one of lora_A, lora_B, lora_B_bias, emb_A,
    emb_B, weight, bias. Keys that still carry an adapter name (``lora_A.default.weight``) are accepted."""
    if not key.startswith(PREFIX):
        raise AdapterError(f"Adapter tensor {key!r} does not start with {PREFIX!r}: not a peft adapter for a "
                           f"causal LM; {_FIX}.")
    rest = key[len(PREFIX):]
    for suffix, kind in _SUFFIXES[:5]:  # the LoRA tensors themselves
        if rest.endswith(suffix) and len(rest) > len(suffix):
            return rest[: -len(suffix)], kind
    named = _NAMED_LORA.match(rest)
    if named:
        module, part, _, suffix = named.groups()
        kind = {"lora_A": "lora_A", "lora_B": "lora_B", "lora_embedding_A": "emb_A", "lora_embedding_B": "emb_B"}[part]
        if suffix == ".bias":
            if kind != "lora_B":
                raise AdapterError(f"Unexpected adapter tensor {key!r}; {_FIX}.")
            kind = "lora_B_bias"
        return module, kind
    for suffix, kind in _SUFFIXES[5:]:  # whole trained tensors: biases, modules_to_save
        if rest.endswith(suffix) and len(rest) > len(suffix) and "lora_" not in rest:
            return rest[: -len(suffix)], kind
    raise AdapterError(f"Unexpected adapter tensor {key!r} (not LoRA A/B, bias or a saved module); {_FIX}.")


def group_adapter_keys(names: Sequence[str]) -> Dict[str, Dict[str, str]]:
    """module path -> {kind: saved key}; duplicate kinds (two spellings of one tensor) are an error."""
    groups: Dict[str, Dict[str, str]] = {}
    for key in names:
        module, kind = parse_adapter_key(key)
        entry = groups.setdefault(module, {})
        if kind in entry:
            raise AdapterError(f"Adapter tensors {entry[kind]!r} and {key!r} are the same tensor twice; {_FIX}.")
        entry[kind] = key
    for module, entry in groups.items():
        for a, b in (("lora_A", "lora_B"), ("emb_A", "emb_B")):
            if (a in entry) != (b in entry):
                raise AdapterError(f"Adapter module {module!r} has {a if a in entry else b} without its partner; "
                                   f"the adapter file is incomplete; {_FIX}.")
        if "lora_B_bias" in entry and "lora_B" not in entry:
            raise AdapterError(f"Adapter module {module!r} has lora_B.bias without lora_B; {_FIX}.")
    return groups


def internlm2_modules(config: Mapping[str, object]) -> Dict[str, Tuple[str, int, int, bool]]:
    """InternLM2 module path -> (type, out_features, in_features, has_bias) from the base config.json.

    type is "linear", "embedding" (out = vocab rows, in = hidden) or "norm" (out = in = hidden)."""
    hidden = int(config["hidden_size"])  # type: ignore[arg-type]
    heads = int(config["num_attention_heads"])  # type: ignore[arg-type]
    kv_heads = int(config.get("num_key_value_heads") or heads)  # type: ignore[arg-type]
    head_dim = hidden // heads
    inter = int(config["intermediate_size"])  # type: ignore[arg-type]
    vocab = int(config["vocab_size"])  # type: ignore[arg-type]
    bias = bool(config.get("bias", False))
    out: Dict[str, Tuple[str, int, int, bool]] = {
        "model.tok_embeddings": ("embedding", vocab, hidden, False),
        "output": ("linear", vocab, hidden, False),
        "model.norm": ("norm", hidden, hidden, False),
    }
    for i in range(int(config["num_hidden_layers"])):  # type: ignore[arg-type]
        p = f"model.layers.{i}."
        out[p + "attention.wqkv"] = ("linear", (heads + 2 * kv_heads) * head_dim, hidden, bias)
        out[p + "attention.wo"] = ("linear", hidden, heads * head_dim, bias)
        out[p + "feed_forward.w1"] = ("linear", inter, hidden, False)
        out[p + "feed_forward.w3"] = ("linear", inter, hidden, False)
        out[p + "feed_forward.w2"] = ("linear", hidden, inter, False)
        out[p + "attention_norm"] = ("norm", hidden, hidden, False)
        out[p + "ffn_norm"] = ("norm", hidden, hidden, False)
    return out


def _expected(kind: str, mtype: str, out_f: int, in_f: int, has_bias: bool, r: Optional[int]) -> Optional[tuple]:
    """The shape a tensor of this kind must have on this module (r None: any rank), or None if it cannot exist."""
    R = -1 if r is None else r
    if mtype == "linear":
        return {"lora_A": (R, in_f), "lora_B": (out_f, R), "lora_B_bias": (out_f,) if has_bias else None,
                "weight": (out_f, in_f), "bias": (out_f,) if has_bias else None}.get(kind)
    if mtype == "embedding":
        return {"emb_A": (R, out_f), "emb_B": (in_f, R), "weight": (out_f, in_f)}.get(kind)
    return {"weight": (out_f,)}.get(kind)  # norm: only a saved module (modules_to_save) makes sense


def _fits(shape: Tuple[int, ...], want: tuple) -> bool:
    return len(shape) == len(want) and all(w == -1 or s == w for s, w in zip(shape, want))


def check_adapter_shapes(shapes: Mapping[str, Sequence[int]], config: Mapping[str, object],
                         adapter: Optional[AdapterConfig] = None) -> List[str]:
    """Problems (empty if none) with adapter tensor shapes against an InternLM2 base config.json.

    ``shapes``: saved key -> shape (from a safetensors header or tensor.shape). With ``adapter`` given, each
    module's rank must also be the r (or rank_pattern entry) its config states, since that sets the scale."""
    problems: List[str] = []
    try:
        groups = group_adapter_keys(list(shapes))
    except AdapterError as exc:
        return [str(exc)]
    modules = internlm2_modules(config)
    layers = int(config["num_hidden_layers"])  # type: ignore[arg-type]
    base = adapter.base_model_name_or_path if adapter else None
    made_for = f" (it was made for {base!r})" if base else ""
    for module, entry in sorted(groups.items()):
        spec = modules.get(module)
        if spec is None:
            layer = _LAYER.match(module)
            if layer and int(layer.group(1)) >= layers:
                problems.append(f"{module}: the adapter has layer {layer.group(1)} but the base model has only "
                                f"{layers} layers; it was trained on a different base model{made_for}.")
            else:
                problems.append(f"{module}: no such InternLM2 module in the base model; the adapter was trained on a "
                                f"different architecture{made_for}.")
            continue
        mtype, out_f, in_f, has_bias = spec
        ranks = set()
        for kind, key in sorted(entry.items()):
            shape = tuple(int(d) for d in shapes[key])
            want = _expected(kind, mtype, out_f, in_f, has_bias, None)
            if want is None:
                what = "bias" if "bias" in kind else kind
                problems.append(f"{key}: the base model's {module} ({mtype}) has no {what}; the adapter was trained "
                                f"on a different base model{made_for}.")
                continue
            if not _fits(shape, want):
                shown = tuple("r" if w == -1 else w for w in want)
                hint = ""
                if module in ("model.tok_embeddings", "output") and kind in ("weight", "emb_A", "lora_B"):
                    hint = (" The vocabulary size differs: the adapter was trained with a resized vocabulary or for "
                            "another base model.")
                problems.append(f"{key} has shape {shape}, the base model needs {shown} (config: hidden_size="
                                f"{config.get('hidden_size')}, num_attention_heads={config.get('num_attention_heads')}"
                                f", num_key_value_heads={config.get('num_key_value_heads')}, intermediate_size="
                                f"{config.get('intermediate_size')}, vocab_size={config.get('vocab_size')}); the "
                                f"adapter does not fit this base model{made_for}.{hint}")
                continue
            if kind in ("lora_A", "emb_A"):
                ranks.add(shape[0])
            elif kind in ("lora_B", "emb_B"):
                ranks.add(shape[1])
        if len(ranks) > 1:
            problems.append(f"{module}: lora A and B disagree on the rank ({sorted(ranks)}); the adapter file is "
                            f"corrupt; {_FIX}.")
        elif ranks and adapter is not None:
            r, _ = adapter.rank_and_alpha(module)
            if ranks != {r}:
                problems.append(f"{module}: weights have rank {ranks.pop()} but adapter_config.json says r={r} "
                                f"(rank_pattern included); the scale alpha/r would be wrong. Use the "
                                f"adapter_config.json saved together with these weights.")
    return problems
