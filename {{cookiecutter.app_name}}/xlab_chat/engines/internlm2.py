"""Run InternLM2 checkpoints as transformers' own LlamaForCausalLM, without the repo's remote code.

InternLM2 is Llama with renamed weights and q/k/v packed into one ``wqkv`` matrix, so a rename plus a
split lets a checkpoint run on transformers' maintained Llama code: no ``trust_remote_code``, no code
from the model folder ever imported, and it keeps working when transformers changes its internals.
"""

from __future__ import annotations

import gc
import inspect
import json
import re
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from .safetensors_file import REMOTE_CODE_HINT, read_safetensors

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_RENAMES = {
    "attention.wo.": "self_attn.o_proj.",
    "feed_forward.w1.": "mlp.gate_proj.",
    "feed_forward.w3.": "mlp.up_proj.",
    "feed_forward.w2.": "mlp.down_proj.",
    "attention_norm.": "input_layernorm.",
    "ffn_norm.": "post_attention_layernorm.",
}
_ROPE_TYPES = ("default", "linear", "dynamic")


def is_internlm2(config: dict) -> bool:
    """True for InternLM2-family configs, which this module can run natively."""
    return config.get("model_type") == "internlm2" or "InternLM2ForCausalLM" in (config.get("architectures") or [])


def check_supported(config: dict) -> None:
    """Fail early, naming the way out, when neither transformers nor this converter knows the architecture."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if is_internlm2(config) or (model_type and model_type in CONFIG_MAPPING):
        return
    raise ValueError(
        f"Architecture model_type={model_type!r} ({config.get('architectures')}) is not supported natively by "
        f"transformers or this app; {REMOTE_CODE_HINT} (only if you trust the model repo)."
    )


def _rope(config: dict) -> Tuple[str, Optional[float]]:
    """The RoPE variant as (rope_type, factor); InternLM2 only ever used none, linear and dynamic NTK."""
    scaling = config.get("rope_scaling")
    if not scaling:
        return "default", None
    rope_type = scaling.get("rope_type") or scaling.get("type") or "default"
    if rope_type not in _ROPE_TYPES:
        raise ValueError(f"InternLM2 rope_scaling type {rope_type!r} is not supported natively; {REMOTE_CODE_HINT}.")
    factor = scaling.get("factor")
    if rope_type != "default" and factor is None:
        raise ValueError(f"InternLM2 rope_scaling {scaling!r} has no factor; {REMOTE_CODE_HINT}.")
    return rope_type, (None if factor is None else float(factor))


def llama_config(config: dict):
    """The LlamaConfig that computes exactly what the InternLM2 config describes (transformers 4.44 to 5.x)."""
    from transformers import LlamaConfig

    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config["hidden_size"])
    if hidden % heads or heads % kv_heads:
        raise ValueError(f"InternLM2 config has hidden_size={hidden}, heads={heads}, kv_heads={kv_heads}: not a GQA "
                         f"layout Llama can express; {REMOTE_CODE_HINT}.")
    if config.get("hidden_act", "silu") != "silu":
        raise ValueError(f"InternLM2 hidden_act={config.get('hidden_act')!r} is not SwiGLU; {REMOTE_CODE_HINT}.")
    theta = float(config.get("rope_theta", 10000.0))
    rope_type, factor = _rope(config)
    bias = bool(config.get("bias", False))  # InternLM2 puts it on wqkv and wo only: Llama's attention_bias
    kwargs = dict(
        vocab_size=int(config["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(config["intermediate_size"]),
        num_hidden_layers=int(config["num_hidden_layers"]),
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        hidden_act="silu",
        max_position_embeddings=int(config.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        initializer_range=float(config.get("initializer_range", 0.02)),
        attention_bias=bias,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=config.get("bos_token_id", 1),
        eos_token_id=config.get("eos_token_id", 2),
        pad_token_id=config.get("pad_token_id", 2),
        use_cache=True,
    )
    if "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters:  # transformers 5
        rope = {"rope_type": rope_type, "rope_theta": theta}
        if factor is not None:
            rope["factor"] = factor
        kwargs["rope_parameters"] = rope
    else:  # transformers 4.x reads rope_theta and rope_scaling (either key spelling)
        kwargs["rope_theta"] = theta
        kwargs["rope_scaling"] = None if factor is None else {"type": rope_type, "rope_type": rope_type,
                                                              "factor": factor}
    llama = LlamaConfig(**kwargs)
    llama.architectures = ["LlamaForCausalLM"]
    return llama


def _split_wqkv(tensor: torch.Tensor, config: dict) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Unpack rows grouped per kv head as [g queries, 1 key, 1 value] into Llama's q, k and v."""
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config["hidden_size"]) // heads
    groups = heads // kv_heads
    rest = tuple(tensor.shape[1:])  # (hidden,) for weights, () for biases
    if tensor.shape[0] != kv_heads * (groups + 2) * head_dim:
        raise ValueError(f"wqkv has {tensor.shape[0]} rows, expected {kv_heads * (groups + 2) * head_dim}")
    packed = tensor.reshape(kv_heads, groups + 2, head_dim, *rest)
    q, k, v = torch.split(packed, [groups, 1, 1], dim=1)
    return tuple(part.reshape(-1, *rest).contiguous() for part in (q, k, v))  # type: ignore[return-value]


def convert_state_dict(tensors: Dict[str, torch.Tensor], config: dict) -> Dict[str, torch.Tensor]:
    """Rename InternLM2 weights to Llama's and split wqkv; unknown names raise so nothing is silently dropped.

    Empties ``tensors`` as it goes, so each packed wqkv is freed as soon as it is split.
    """
    out: Dict[str, torch.Tensor] = {}
    for name in list(tensors):
        tensor = tensors.pop(name)
        if name.startswith("model.tok_embeddings."):
            out["model.embed_tokens." + name[len("model.tok_embeddings."):]] = tensor
        elif name.startswith("output."):
            out["lm_head." + name[len("output."):]] = tensor
        elif name.startswith("model.norm."):
            out[name] = tensor
        elif _LAYER.match(name):
            index, rest = _LAYER.match(name).groups()  # type: ignore[union-attr]
            prefix = f"model.layers.{index}."
            if rest.startswith("attention.wqkv."):
                suffix = rest[len("attention.wqkv."):]
                q, k, v = _split_wqkv(tensor, config)
                out[prefix + "self_attn.q_proj." + suffix] = q
                out[prefix + "self_attn.k_proj." + suffix] = k
                out[prefix + "self_attn.v_proj." + suffix] = v
                continue
            for old, new in _RENAMES.items():
                if rest.startswith(old):
                    out[prefix + new + rest[len(old):]] = tensor
                    break
            else:
                if "rotary_emb" not in rest:  # old checkpoints saved the RoPE cache: recomputed, not needed
                    raise ValueError(f"Unexpected InternLM2 weight {name!r}; {REMOTE_CODE_HINT}.")
        else:
            raise ValueError(f"Unexpected InternLM2 weight {name!r}; {REMOTE_CODE_HINT}.")
    return out


def _shard_files(folder: Path) -> List[Path]:
    """The checkpoint's weight files, safetensors preferred, in index order."""
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        index = folder / index_name
        if index.is_file():
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            return [folder / name for name in sorted(set(weight_map.values()))]
        if (folder / single).is_file():
            return [folder / single]
    raise FileNotFoundError(f"No model.safetensors or pytorch_model.bin (or their index) in {folder}")


def _read_shard(path: Path, dtype: torch.dtype) -> Dict[str, torch.Tensor]:
    """One shard's tensors, floating point ones in dtype, in memory of their own (never views of a mapped file)."""
    if path.suffix == ".safetensors":
        tensors = read_safetensors(path)
    else:
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)  # read, not mapped, likewise
    return {name: tensor.to(dtype) if tensor.is_floating_point() else tensor for name, tensor in tensors.items()}


def _rebuild_rope(model: torch.nn.Module, device: str) -> None:
    """RoPE buffers are computed, not loaded: build them for real where the meta model left them empty."""
    for name, module in list(model.named_modules()):
        if "RotaryEmbedding" not in type(module).__name__:
            continue
        if not any(buffer.is_meta for buffer in module.buffers()):
            continue
        with torch.device("cpu"):  # not the meta device the model was built under
            fresh = type(module)(config=model.config).to(device)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, fresh)


def load_internlm2_as_llama(folder: Path, dtype: torch.dtype, device: str = "cpu", quantize_int8: bool = False,
                            adapter: Optional[object] = None):
    """Build an empty (meta) Llama and fill it shard by shard, so RAM holds about one copy of the weights.

    With quantize_int8 each shard's Linear weights become int8 as soon as they are in, so the peak is the int8
    weights so far plus one shard: never a whole float copy. A LoRA ``adapter`` (engines/lora.py) is merged into
    each shard's InternLM2 tensors before they are renamed and split, so nothing is written to disk.
    """
    from transformers import GenerationConfig, LlamaForCausalLM

    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    if not is_internlm2(config):
        raise ValueError(f"{folder} is not an InternLM2 checkpoint (model_type={config.get('model_type')!r})")
    llama = llama_config(config)
    with torch.device("meta"):
        model = LlamaForCausalLM(llama)
    applied: Dict[str, str] = {}
    for path in _shard_files(folder):  # one shard at a time: peak RAM is the weights plus one shard
        tensors = _read_shard(path, dtype)
        if adapter is not None:
            from .lora import merge_into

            applied.update(merge_into(tensors, adapter))
        part = convert_state_dict(tensors, config)
        del tensors
        part = {name: tensor.to(device) for name, tensor in part.items()}
        model.load_state_dict(part, strict=False, assign=True)
        del part
        if quantize_int8:
            from .int8 import KEEP_FLOAT, quantize_loaded_linears_

            quantize_loaded_linears_(model, skip=KEEP_FLOAT)
        gc.collect()
    if adapter is not None:
        from .lora import assert_all_applied

        assert_all_applied(adapter, applied)
    _rebuild_rope(model, device)
    missing = [name for name, tensor in _named_tensors(model) if tensor.is_meta]
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise ValueError(f"The checkpoint in {folder} lacks {len(missing)} weights ({shown}); it is incomplete "
                         f"or not a standard InternLM2 layout; {REMOTE_CODE_HINT}.")
    _set_dtype(llama, dtype)
    llama._name_or_path = str(folder)
    if (folder / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(str(folder))
    else:
        model.generation_config = GenerationConfig.from_model_config(llama)
    model.eval()
    return model


def reset_dynamic_rope(model: torch.nn.Module) -> None:
    """Forget the longest length a dynamic-NTK RoPE has seen, so each generation starts from scratch.

    transformers' dynamic RoPE keeps the frequencies of the longest sequence so far until a call is shorter
    than max_position_embeddings; without a reset, a prompt between the two lengths would get stale
    frequencies and replies would depend on earlier chats. Call it before every generate(); a no-op
    for models without dynamic RoPE.
    """
    for module in model.modules():
        original = getattr(module, "original_inv_freq", None)
        if "RotaryEmbedding" not in type(module).__name__ or original is None:
            continue
        if not hasattr(module, "original_max_seq_len"):
            continue
        module.register_buffer("inv_freq", original.clone(), persistent=False)
        module.max_seq_len_cached = module.original_max_seq_len


def _named_tensors(model: torch.nn.Module) -> Iterator[Tuple[str, torch.Tensor]]:
    yield from model.named_parameters()
    yield from model.named_buffers()


def _set_dtype(config: object, dtype: torch.dtype) -> None:
    """Record the dtype under the name this transformers version reads (dtype, or torch_dtype before 4.56)."""
    if hasattr(config, "dtype"):
        config.dtype = dtype
    else:
        config.torch_dtype = dtype


def _special_tokens(folder: Path) -> Tuple[dict, List[str]]:
    """tokenizer_config.json and its added/special token strings in id order."""
    path = folder / "tokenizer_config.json"
    tok_config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    decoder = tok_config.get("added_tokens_decoder") or {}
    names = [entry["content"] for _, entry in sorted(decoder.items(), key=lambda item: int(item[0]))]
    for token in tok_config.get("additional_special_tokens") or []:
        token = token["content"] if isinstance(token, dict) else token
        if token not in names:
            names.append(token)
    return tok_config, names


def native_tokenizer(folder: Path):
    """A transformers tokenizer for InternLM2's tokenizer.model that runs no code from the repo.

    InternLM2Tokenizer is sentencepiece's own encode applied between special tokens (no extra prefix
    handling), which is what transformers' sentencepiece Llama tokenizer does in legacy mode.
    """
    folder = Path(folder)
    tok_config, names = _special_tokens(folder)
    specials = [name for name in names if name not in ("<unk>", "<s>", "</s>")]
    kwargs = dict(
        vocab_file=str(folder / "tokenizer.model"),
        bos_token=_content(tok_config.get("bos_token"), "<s>"),
        eos_token=_content(tok_config.get("eos_token"), "</s>"),
        unk_token=_content(tok_config.get("unk_token"), "<unk>"),
        pad_token=_content(tok_config.get("pad_token"), "</s>"),
        add_bos_token=bool(tok_config.get("add_bos_token", True)),
        add_eos_token=bool(tok_config.get("add_eos_token", False)),
        additional_special_tokens=specials,
        clean_up_tokenization_spaces=bool(tok_config.get("clean_up_tokenization_spaces", False)),
        legacy=True,
        model_max_length=int(min(tok_config.get("model_max_length") or 1 << 60, 1 << 60)),
    )
    tokenizer = _sentencepiece_llama_class()(**kwargs)
    template = tok_config.get("chat_template")
    if template is None and (folder / "chat_template.jinja").is_file():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    if template:
        tokenizer.chat_template = template
    tokenizer.name_or_path = str(folder)
    return tokenizer


def _content(token: object, default: str) -> str:
    if isinstance(token, dict):
        return str(token.get("content", default))
    return str(token) if token else default


def _sentencepiece_llama_class():
    """transformers' sentencepiece-backed Llama tokenizer: LlamaTokenizer in 4.x, a small subclass in 5.x."""
    import transformers

    backend = getattr(transformers, "SentencePieceBackend", None)
    if backend is None:  # transformers 4.x: LlamaTokenizer is the slow sentencepiece tokenizer
        return transformers.LlamaTokenizer

    class SentencePieceLlamaTokenizer(backend):
        """sentencepiece encode between special tokens, bos first: InternLM2Tokenizer's encoding."""

        model_input_names = ["input_ids", "attention_mask"]

        def __init__(self, add_bos_token: bool = True, add_eos_token: bool = False, **kwargs: object) -> None:
            self.add_bos_token = add_bos_token
            self.add_eos_token = add_eos_token
            super().__init__(**kwargs)

        def build_inputs_with_special_tokens(self, token_ids_0: List[int],
                                             token_ids_1: Optional[List[int]] = None) -> List[int]:
            bos = [self.bos_token_id] if self.add_bos_token else []
            eos = [self.eos_token_id] if self.add_eos_token else []
            out = bos + list(token_ids_0) + eos
            if token_ids_1 is not None:
                out += bos + list(token_ids_1) + eos
            return out

        def convert_tokens_to_string(self, tokens: List[str]) -> str:
            """sentencepiece's own decode (byte fallback, dummy prefix) between special tokens."""
            specials = set(self.all_special_tokens)
            out, run = [], []  # type: List[str], List[str]
            for token in tokens:
                if token in specials:
                    out.append(self.sp_model.decode_pieces(run) + token)
                    run = []
                else:
                    run.append(token)
            out.append(self.sp_model.decode_pieces(run))
            return "".join(out)

    return SentencePieceLlamaTokenizer


def tokenizer_matches(native: object, reference: object, samples: Sequence[str]) -> bool:
    """True when both tokenizers give the same ids (with and without special tokens) for every sample."""
    for text in samples:
        for special in (True, False):
            if list(native(text, add_special_tokens=special)["input_ids"]) != list(
                    reference(text, add_special_tokens=special)["input_ids"]):
                return False
    return True
