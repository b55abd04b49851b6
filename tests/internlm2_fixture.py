"""A tiny InternLM2-layout checkpoint, built on the fly, that carries its own remote-code oracle.

The weights use InternLM2's names and packed ``wqkv``. The folder also gets ``configuration_internlm2.py``
and ``modeling_internlm2.py``: a plain, separately written InternLM2 forward pass (packed attention grouped
per kv head, rotate-half RoPE with InternLM2's dynamic NTK, RMSNorm, SwiGLU) that transformers loads with
``trust_remote_code=True``. The native Llama conversion is checked against it.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Dict, Optional

import tinymodel

IM_SPECIALS = ["<|im_start|>", "<|im_end|>"]

CONFIGURATION_SOURCE = '''
from transformers import PretrainedConfig


class InternLM2Config(PretrainedConfig):
    model_type = "internlm2"

    def __init__(self, vocab_size=400, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=64,
                 rms_norm_eps=1e-6, rope_theta=10000.0, rope_scaling=None, bias=False, bos_token_id=1,
                 eos_token_id=2, pad_token_id=2, tie_word_embeddings=False, **kwargs):
        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.intermediate_size = intermediate_size
        self.num_hidden_layers = num_hidden_layers
        self.num_attention_heads = num_attention_heads
        self.num_key_value_heads = num_key_value_heads
        self.hidden_act = hidden_act
        self.max_position_embeddings = max_position_embeddings
        self.rms_norm_eps = rms_norm_eps
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.internlm2_rope = rope_scaling  # untouched by transformers' rope_scaling handling
        self.bias = bias
        super().__init__(bos_token_id=bos_token_id, eos_token_id=eos_token_id, pad_token_id=pad_token_id,
                         tie_word_embeddings=tie_word_embeddings, **kwargs)
'''

MODELING_SOURCE = '''
"""Reference InternLM2 forward pass, written from the architecture description, for tests only."""
import math

import torch
from einops import rearrange
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_internlm2 import InternLM2Config


class InternLM2RMSNorm(nn.Module):
    def __init__(self, size, eps):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return self.weight * (x.float() * torch.rsqrt(variance + self.eps)).to(x.dtype)


def rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rope_cos_sin(config, head_dim, start, length, device):
    """cos/sin for positions start..start+length-1, as InternLM2's rotary classes compute them."""
    base = float(config.rope_theta)
    scaling = config.internlm2_rope or {}
    kind = scaling.get("type") or scaling.get("rope_type")
    factor = float(scaling.get("factor", 1.0))
    seq_len = start + length
    if kind == "dynamic" and seq_len > config.max_position_embeddings:
        grow = factor * seq_len / config.max_position_embeddings - (factor - 1)
        base = base * grow ** (head_dim / (head_dim - 2))
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device).float() / head_dim))
    positions = torch.arange(start, seq_len, device=device).float()
    if kind == "linear":
        positions = positions / factor
    freqs = torch.outer(positions, inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


class InternLM2Attention(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads
        self.groups = self.heads // self.kv_heads
        self.head_dim = config.hidden_size // self.heads
        rows = (self.heads + 2 * self.kv_heads) * self.head_dim
        self.wqkv = nn.Linear(config.hidden_size, rows, bias=config.bias)
        self.wo = nn.Linear(self.heads * self.head_dim, config.hidden_size, bias=config.bias)

    def forward(self, x, start, cache):
        batch, length, _ = x.shape
        qkv = rearrange(self.wqkv(x), "b q (h gs d) -> b q h gs d", gs=self.groups + 2, d=self.head_dim)
        q = qkv[:, :, :, : self.groups].reshape(batch, length, self.heads, self.head_dim).transpose(1, 2)
        k = qkv[:, :, :, self.groups].transpose(1, 2)
        v = qkv[:, :, :, self.groups + 1].transpose(1, 2)
        cos, sin = rope_cos_sin(self.config, self.head_dim, start, length, x.device)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)
        k = k.repeat_interleave(self.groups, dim=1)
        v = v.repeat_interleave(self.groups, dim=1)
        scores = torch.matmul(q, k.transpose(2, 3)) / math.sqrt(self.head_dim)
        query_pos = torch.arange(start, start + length, device=x.device)[:, None]
        key_pos = torch.arange(k.shape[2], device=x.device)[None, :]
        scores = scores.masked_fill(key_pos > query_pos, float("-inf"))
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        out = torch.matmul(probs, v).transpose(1, 2).reshape(batch, length, self.heads * self.head_dim)
        return self.wo(out)


class InternLM2MLP(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.w1 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w3 = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.w2 = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)

    def forward(self, x):
        return self.w2(nn.functional.silu(self.w1(x)) * self.w3(x))


class InternLM2DecoderLayer(nn.Module):
    def __init__(self, config, layer_idx):
        super().__init__()
        self.attention = InternLM2Attention(config, layer_idx)
        self.feed_forward = InternLM2MLP(config)
        self.attention_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.ffn_norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, x, start, cache):
        x = x + self.attention(self.attention_norm(x), start, cache)
        return x + self.feed_forward(self.ffn_norm(x))


class InternLM2PreTrainedModel(PreTrainedModel):
    config_class = InternLM2Config
    base_model_prefix = "model"
    _no_split_modules = ["InternLM2DecoderLayer"]

    def _init_weights(self, module):
        pass


class InternLM2Model(InternLM2PreTrainedModel):
    def __init__(self, config):
        super().__init__(config)
        self.tok_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(InternLM2DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = InternLM2RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_init()

    def forward(self, input_ids, cache=None):
        start = cache.get_seq_length() if cache is not None else 0
        x = self.tok_embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, start, cache)
        return self.norm(x)


class InternLM2ForCausalLM(InternLM2PreTrainedModel, GenerationMixin):
    def __init__(self, config):
        super().__init__(config)
        self.model = InternLM2Model(config)
        self.output = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.model.tok_embeddings

    def forward(self, input_ids=None, attention_mask=None, past_key_values=None, use_cache=None, **kwargs):
        if attention_mask is not None and not bool(attention_mask.all()):
            raise ValueError("the test oracle runs unpadded batches only")
        hidden = self.model(input_ids, past_key_values if use_cache is not False else None)
        return CausalLMOutputWithPast(logits=self.output(hidden).float(), past_key_values=past_key_values)
'''


TOKENIZATION_SOURCE = '''
"""InternLM2Tokenizer as the chat repos ship it: slow, sentencepiece-backed, bos first, no prefix handling."""
import os
from shutil import copyfile

import sentencepiece as spm
from transformers import PreTrainedTokenizer

VOCAB_FILES_NAMES = {"vocab_file": "tokenizer.model"}


class InternLM2Tokenizer(PreTrainedTokenizer):
    vocab_files_names = VOCAB_FILES_NAMES
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="</s>",
                 sp_model_kwargs=None, add_bos_token=True, add_eos_token=False, decode_with_prefix_space=False,
                 clean_up_tokenization_spaces=False, **kwargs):
        self.sp_model_kwargs = sp_model_kwargs or {}
        self.vocab_file = vocab_file
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        self.decode_with_prefix_space = decode_with_prefix_space
        self.sp_model = spm.SentencePieceProcessor(**self.sp_model_kwargs)
        self.sp_model.Load(vocab_file)  # before the base class, which asks for the vocab
        super().__init__(bos_token=bos_token, eos_token=eos_token, unk_token=unk_token, pad_token=pad_token,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    @property
    def bos_token_id(self):
        return self.sp_model.bos_id()

    @property
    def eos_token_id(self):
        return self.sp_model.eos_id()

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def convert_tokens_to_string(self, tokens):
        """sentencepiece decodes each run between special tokens; as in the original, a run that ends at a
        special token gets a space in front (so a decode that keeps special tokens may start with a space)."""
        specials = set(self.all_special_tokens)
        text, run, after_special = "", [], False
        for token in tokens:
            if token in specials:
                text += ("" if after_special else " ") + self.sp_model.decode(run) + token
                run, after_special = [], True
            else:
                run.append(token)
                after_special = False
        return self.clean_up_tokenization(text + self.sp_model.decode(run))

    def save_vocabulary(self, save_directory, filename_prefix=None):
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out) and os.path.isfile(self.vocab_file):
            copyfile(self.vocab_file, out)
        elif not os.path.isfile(self.vocab_file):
            with open(out, "wb") as handle:
                handle.write(self.sp_model.serialized_model_proto())
        return (out,)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        out = ([self.bos_token_id] if self.add_bos_token else []) + list(token_ids_0)
        if token_ids_1 is not None:
            out += list(token_ids_1)
        return out + ([self.eos_token_id] if self.add_eos_token else [])

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return super().get_special_tokens_mask(token_ids_0, token_ids_1, already_has_special_tokens=True)
        body = len(token_ids_0) + len(token_ids_1 or [])
        return [1] * self.add_bos_token + [0] * body + [1] * self.add_eos_token

    def create_token_type_ids_from_sequences(self, token_ids_0, token_ids_1=None):
        return [0] * len(self.build_inputs_with_special_tokens(token_ids_0, token_ids_1))
'''


def _special_entry(content: str) -> dict:
    return {"content": content, "lstrip": False, "rstrip": False, "normalized": False, "single_word": False,
            "special": True}


def _write_tokenizer(folder: Path) -> int:
    """tinymodel's sentencepiece tokenizer, with InternLM2's tokenizer_config layout; returns its vocab size."""
    tinymodel._train_tokenizer(folder)
    return _internlm2_tokenizer_files(folder)


def _internlm2_tokenizer_files(folder: Path) -> int:
    """tokenizer_config.json as InternLM2 chat repos have it, plus their remote-code tokenizer, for the
    tokenizer.model already in folder; returns the vocab size."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    config.update({
        "tokenizer_class": "InternLM2Tokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": "</s>", "add_bos_token": True, "add_eos_token": False,
        "additional_special_tokens": list(IM_SPECIALS), "chat_template": tinymodel.CHAT_TEMPLATE,
        "model_max_length": config.get("model_max_length", 4096), "clean_up_tokenization_spaces": False,
        "decode_with_prefix_space": False,
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer", None]},
        "added_tokens_decoder": {str(sp.piece_to_id(t)): _special_entry(t)
                                 for t in ["<unk>", "<s>", "</s>", *IM_SPECIALS]},
    })
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False), encoding="utf-8")
    (folder / "tokenization_internlm2.py").write_text(TOKENIZATION_SOURCE.lstrip(), encoding="utf-8")
    return sp.get_piece_size()


def internlm2_weights(config: dict, seed: int = 0) -> Dict[str, object]:
    """Random InternLM2-named weights, scaled so activations and logits are far from zero and varied."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    rows = (heads + 2 * kv) * (hidden // heads)

    def normal(*shape: int, std: float) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * std

    weights = {"model.tok_embeddings.weight": normal(config["vocab_size"], hidden, std=1.0),
               "model.norm.weight": 1.0 + normal(hidden, std=0.1),
               "output.weight": normal(config["vocab_size"], hidden, std=2.0 / math.sqrt(hidden))}
    for i in range(config["num_hidden_layers"]):
        prefix = f"model.layers.{i}."
        weights[prefix + "attention.wqkv.weight"] = normal(rows, hidden, std=1.0 / math.sqrt(hidden))
        weights[prefix + "attention.wo.weight"] = normal(hidden, heads * hidden // heads, std=1.0 / math.sqrt(hidden))
        if config.get("bias"):
            weights[prefix + "attention.wqkv.bias"] = normal(rows, std=0.1)
            weights[prefix + "attention.wo.bias"] = normal(hidden, std=0.1)
        weights[prefix + "feed_forward.w1.weight"] = normal(inter, hidden, std=1.0 / math.sqrt(hidden))
        weights[prefix + "feed_forward.w3.weight"] = normal(inter, hidden, std=1.0 / math.sqrt(hidden))
        weights[prefix + "feed_forward.w2.weight"] = normal(hidden, inter, std=1.0 / math.sqrt(inter))
        weights[prefix + "attention_norm.weight"] = 1.0 + normal(hidden, std=0.1)
        weights[prefix + "ffn_norm.weight"] = 1.0 + normal(hidden, std=0.1)
    return weights


def _write_weights(folder: Path, weights: dict, fmt: str, shards: int) -> None:
    """One file, or several shards plus the index transformers writes, in safetensors or .bin form."""
    import torch
    from safetensors.torch import save_file

    names = list(weights)
    groups = [names[i::shards] for i in range(shards)]
    ext = "safetensors" if fmt == "safetensors" else "bin"
    stem = "model" if fmt == "safetensors" else "pytorch_model"
    weight_map = {}
    for index, group in enumerate(groups, start=1):
        filename = f"{stem}.{ext}" if shards == 1 else f"{stem}-{index:05d}-of-{shards:05d}.{ext}"
        part = {name: weights[name].contiguous() for name in group}
        if fmt == "safetensors":
            save_file(part, str(folder / filename), metadata={"format": "pt"})
        else:
            torch.save(part, str(folder / filename))
        weight_map.update({name: filename for name in group})
    if shards > 1:
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / f"{stem}.{ext}.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")


def build_internlm2(folder: Path, *, hidden: int = 64, layers: int = 2, heads: int = 4, kv_heads: int = 2,
                    intermediate: Optional[int] = None, max_position_embeddings: int = 64,
                    rope_theta: float = 10000.0, rope_scaling: Optional[dict] = None, bias: bool = False,
                    fmt: str = "safetensors", shards: int = 1, seed: int = 0, dtype: str = "float32") -> Path:
    """Write a tiny InternLM2 checkpoint (config, weights, tokenizer, remote-code oracle) into folder."""
    import torch

    folder.mkdir(parents=True, exist_ok=True)
    vocab_size = _write_tokenizer(folder)
    config = _internlm2_config(vocab_size, hidden, layers, heads, kv_heads, intermediate or 2 * hidden,
                               max_position_embeddings, rope_theta, rope_scaling, bias, dtype)
    weights = internlm2_weights(config, seed)
    _write_repo(folder, config, {name: t.to(getattr(torch, dtype)) for name, t in weights.items()}, fmt, shards)
    return folder


def _internlm2_config(vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int, intermediate: int,
                      max_position_embeddings: int, rope_theta: float, rope_scaling: Optional[dict], bias: bool,
                      dtype: str, rms_norm_eps: float = 1e-6) -> dict:
    return {
        "architectures": ["InternLM2ForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config",
                     "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"},
        "model_type": "internlm2", "vocab_size": vocab_size, "hidden_size": hidden,
        "intermediate_size": intermediate, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "hidden_act": "silu",
        "max_position_embeddings": max_position_embeddings, "rms_norm_eps": rms_norm_eps, "rope_theta": rope_theta,
        "rope_scaling": rope_scaling, "bias": bias, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
        "tie_word_embeddings": False, "torch_dtype": dtype, "attn_implementation": "eager", "use_cache": True,
    }


def _write_repo(folder: Path, config: dict, weights: dict, fmt: str = "safetensors", shards: int = 1) -> None:
    """config.json, generation_config.json (eos and <|im_end|>), the weights and the remote-code oracle."""
    (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = {"bos_token_id": 1, "eos_token_id": [2, tinymodel_im_end_id(folder)], "pad_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2), encoding="utf-8")
    _write_weights(folder, weights, fmt, shards)
    (folder / "configuration_internlm2.py").write_text(CONFIGURATION_SOURCE.lstrip(), encoding="utf-8")
    (folder / "modeling_internlm2.py").write_text(MODELING_SOURCE.lstrip(), encoding="utf-8")


def pack_llama_state_dict(tensors: Dict[str, object], config: dict) -> Dict[str, object]:
    """Llama weight names to InternLM2's, q/k/v packed into wqkv per kv head as [g queries, key, value]:
    the inverse of the app's converter, written separately so the two check each other."""
    import torch

    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    head_dim, groups = config["hidden_size"] // heads, heads // kv_heads
    renames = {"self_attn.o_proj.": "attention.wo.", "mlp.gate_proj.": "feed_forward.w1.",
               "mlp.up_proj.": "feed_forward.w3.", "mlp.down_proj.": "feed_forward.w2.",
               "input_layernorm.": "attention_norm.", "post_attention_layernorm.": "ffn_norm."}
    out: Dict[str, object] = {}
    for name, tensor in tensors.items():
        if name.startswith("model.embed_tokens."):
            out["model.tok_embeddings." + name[len("model.embed_tokens."):]] = tensor
        elif name.startswith("lm_head."):
            out["output." + name[len("lm_head."):]] = tensor
        elif name.startswith("model.norm."):
            out[name] = tensor
        elif ".self_attn.k_proj." in name or ".self_attn.v_proj." in name:
            continue  # packed together with q_proj below
        elif ".self_attn.q_proj." in name:
            prefix, suffix = name.split(".self_attn.q_proj.")
            parts = [tensors[f"{prefix}.self_attn.{p}_proj.{suffix}"] for p in "qkv"]
            rest = tuple(parts[0].shape[1:])
            q = parts[0].reshape(kv_heads, groups, head_dim, *rest)
            k, v = (t.reshape(kv_heads, 1, head_dim, *rest) for t in parts[1:])
            out[f"{prefix}.attention.wqkv.{suffix}"] = torch.cat([q, k, v], dim=1).reshape(-1, *rest).contiguous()
        else:
            old = next((old for old in renames if f".{old}" in name), None)
            if old is None or not name.startswith("model.layers."):
                raise ValueError(f"unexpected Llama weight {name!r}")
            out[name.replace(f".{old}", f".{renames[old]}")] = tensor
    return out


def internlm2_from_llama(llama_folder: Path, out_folder: Path) -> Path:
    """An InternLM2 repo (remote code included) holding a trained tiny Llama, e.g. tinymodel.build_chat_model's.

    The tokenizer.model is the Llama's with sentencepiece's identity normaliser and no dummy prefix, so
    InternLM2Tokenizer gives the very ids the Llama was trained on (the fast Llama tokenizer neither
    NFKC-normalises nor prefixes text after special tokens): the InternLM2 model chats as the Llama does.
    """
    from safetensors.torch import load_file
    from sentencepiece import sentencepiece_model_pb2

    out_folder.mkdir(parents=True, exist_ok=True)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((llama_folder / "tokenizer.model").read_bytes())
    spec = proto.normalizer_spec
    spec.name, spec.precompiled_charsmap, spec.add_dummy_prefix, spec.remove_extra_whitespaces = "identity", b"", \
        False, False
    (out_folder / "tokenizer.model").write_bytes(proto.SerializeToString())
    vocab_size = _internlm2_tokenizer_files(out_folder)
    llama = json.loads((llama_folder / "config.json").read_text(encoding="utf-8"))
    rope = llama.get("rope_parameters") or {}
    if (rope.get("rope_type") or "default") != "default" or llama.get("rope_scaling"):
        raise ValueError("only Llamas without RoPE scaling are converted")
    if llama["vocab_size"] != vocab_size or llama.get("attention_bias") or llama.get("mlp_bias"):
        raise ValueError(f"{llama_folder} is not a tokenizer-matched, bias-free Llama")
    config = _internlm2_config(
        vocab_size, llama["hidden_size"], llama["num_hidden_layers"], llama["num_attention_heads"],
        llama.get("num_key_value_heads") or llama["num_attention_heads"], llama["intermediate_size"],
        llama["max_position_embeddings"], float(rope.get("rope_theta", llama.get("rope_theta", 10000.0))), None,
        False, str(llama.get("dtype") or llama.get("torch_dtype") or "float32"), llama.get("rms_norm_eps", 1e-6))
    tensors: Dict[str, object] = {}
    for path in sorted(llama_folder.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    _write_repo(out_folder, config, pack_llama_state_dict(tensors, config))
    return out_folder


def tinymodel_im_end_id(folder: Path) -> int:
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model")).piece_to_id(IM_SPECIALS[1])


def publish_internlm2(model_folder: Path, bare: Path) -> str:
    """Push the checkpoint into a local bare git-lfs repo (file:// URL), as a Hub repo would serve it."""
    return tinymodel.publish(model_folder, bare, message="internlm2 model")


# ---------------------------------------------------------------- a repo laid out like internlm2-chat-7b

TOKENIZATION_FAST_SOURCE = '''
"""InternLM2TokenizerFast for the tests: the tokenizers-backed twin of InternLM2Tokenizer.

InternLM2 chat repos ship no tokenizer.json, so this class builds its backend from tokenizer.model at load
time, through the converter registered below (byte-fallback BPE, spaces as U+2581, no pre-tokenizer).
"""
import os
from shutil import copyfile

from tokenizers import Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE
from transformers.convert_slow_tokenizer import SLOW_TO_FAST_CONVERTERS, SentencePieceExtractor, SpmConverter
from transformers.tokenization_utils_fast import PreTrainedTokenizerFast
from transformers.utils import logging

from .tokenization_internlm2 import InternLM2Tokenizer

logger = logging.get_logger(__name__)

VOCAB_FILES_NAMES = {"vocab_file": "./tokenizer.model"}
SPACE = "\\u2581"
RESERVED = ("<unk>", "<s>", "</s>")  # ids 0, 1 and 2, whatever tokenizer.model calls them


class InternLM2Converter(SpmConverter):
    handle_byte_fallback = True

    def vocab(self, proto):
        scored = [(piece.piece, piece.score) for piece in proto.pieces]
        for index, name in enumerate(RESERVED):
            scored[index] = (name, scored[index][1])
        return scored

    def unk_id(self, proto):
        return 0

    def tokenizer(self, proto):
        if proto.trainer_spec.model_type != 2:
            raise ValueError("InternLM2TokenizerFast converts a BPE tokenizer.model only")
        scored = self.vocab(proto)
        added = dict(getattr(self.original_tokenizer, "added_tokens_decoder", None) or {})
        for index, token in added.items():  # the config's spelling of a token wins over the model's piece
            if index < len(scored):
                scored[index] = (str(token), scored[index][1])
        _, merges = SentencePieceExtractor(self.original_tokenizer.vocab_file).extract(scored)
        ids = {piece: index for index, (piece, _) in enumerate(scored)}
        backend = Tokenizer(BPE(ids, merges, unk_token=scored[self.unk_id(proto)][0], fuse_unk=True,
                                byte_fallback=True))
        backend.add_special_tokens([str(token) for _, token in sorted(added.items())])
        return backend

    def normalizer(self, proto):
        steps = [normalizers.Replace(" ", SPACE)]
        if proto.normalizer_spec.add_dummy_prefix:
            steps.insert(0, normalizers.Prepend(SPACE))
        return normalizers.Sequence(steps)

    def pre_tokenizer(self, replacement, add_prefix_space):
        return None

    def decoder(self, replacement, add_prefix_space):
        steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
        if self.proto.normalizer_spec.add_dummy_prefix:
            steps.append(decoders.Strip(content=" ", left=1))
        return decoders.Sequence(steps)

    def post_processor(self):
        return None  # the tokenizer class sets its own, from add_bos_token and add_eos_token


SLOW_TO_FAST_CONVERTERS[InternLM2Tokenizer.__name__] = InternLM2Converter


class InternLM2TokenizerFast(PreTrainedTokenizerFast):
    vocab_files_names = VOCAB_FILES_NAMES
    slow_tokenizer_class = InternLM2Tokenizer
    padding_side = "left"
    model_input_names = ["input_ids", "attention_mask"]
    _auto_class = "AutoTokenizer"

    def __init__(self, vocab_file=None, tokenizer_file=None, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                 pad_token="</s>", sp_model_kwargs=None, add_bos_token=True, add_eos_token=False,
                 decode_with_prefix_space=False, clean_up_tokenization_spaces=False, **kwargs):
        self._add_bos_token = add_bos_token
        self._add_eos_token = add_eos_token
        super().__init__(vocab_file=vocab_file, tokenizer_file=tokenizer_file, unk_token=unk_token,
                         bos_token=bos_token, eos_token=eos_token, pad_token=pad_token,
                         sp_model_kwargs=sp_model_kwargs, add_bos_token=add_bos_token, add_eos_token=add_eos_token,
                         decode_with_prefix_space=decode_with_prefix_space,
                         clean_up_tokenization_spaces=clean_up_tokenization_spaces, **kwargs)
        self.vocab_file = vocab_file
        self.update_post_processor()

    @property
    def can_save_slow_tokenizer(self):
        return bool(self.vocab_file) and os.path.isfile(self.vocab_file)

    @property
    def add_bos_token(self):
        return self._add_bos_token

    @add_bos_token.setter
    def add_bos_token(self, value):
        self._add_bos_token = value
        self.update_post_processor()

    @property
    def add_eos_token(self):
        return self._add_eos_token

    @add_eos_token.setter
    def add_eos_token(self, value):
        self._add_eos_token = value
        self.update_post_processor()

    def update_post_processor(self):
        """bos before the text (and eos after it) as the slow class does; a pair shares the one bos."""
        before = [(self.bos_token, self.bos_token_id)] if self._add_bos_token else []
        after = [(self.eos_token, self.eos_token_id)] if self._add_eos_token else []
        if any(token is None or token_id is None for token, token_id in before + after):
            raise ValueError("add_bos_token/add_eos_token need bos_token/eos_token")
        single = [f"{token}:0" for token, _ in before] + ["$A:0"] + [f"{token}:0" for token, _ in after]
        pair = [f"{token}:0" for token, _ in before] + ["$A:0", "$B:1"] + [f"{token}:1" for token, _ in after]
        self._tokenizer.post_processor = processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair),
                                                                       special_tokens=before + after)

    def save_vocabulary(self, save_directory, filename_prefix=None):
        if not self.can_save_slow_tokenizer:
            raise ValueError("this fast tokenizer was not made from a tokenizer.model, so it cannot write one")
        if not os.path.isdir(save_directory):
            logger.error(f"Vocabulary path ({save_directory}) should be a directory")
            return None
        out = os.path.join(save_directory, (filename_prefix + "-" if filename_prefix else "") + "tokenizer.model")
        if os.path.abspath(self.vocab_file) != os.path.abspath(out):
            copyfile(self.vocab_file, out)
        return (out,)
'''

# What internlm2-chat-7b's own files say, where the tiny model may say the same (see the research notes).
SPECIAL_TOKENS_MAP_7B = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>"}
UPSTREAM_ROPE_SCALING = {"type": "dynamic", "factor": 2.0}
UPSTREAM_MODEL_MAX_LENGTH = 1000000000000000019884624838656  # int(1e30), as transformers writes it
README_7B = """---
license: other
pipeline_tag: text-generation
---
# tiny InternLM2 chat (test fixture)

A few-kilobyte InternLM2 chat model with the file layout of internlm2-chat-7b, made by the
xlab-chat-template tests. Load it with `trust_remote_code=True`.
"""


def _contiguous_shards(names: list, sizes: Dict[str, int], shards: int) -> list:
    """Split names, in order, into `shards` non-empty runs of about equal bytes (save_pretrained's way)."""
    if len(names) < shards:
        raise ValueError(f"{len(names)} tensors cannot fill {shards} shards")
    groups, start = [], 0
    for left in range(shards, 0, -1):
        if left == 1:
            groups.append(names[start:])
            break
        target = sum(sizes[n] for n in names[start:]) / left
        end, total = start + 1, sizes[names[start]]
        while end < len(names) - (left - 1) and total + sizes[names[end]] <= target:
            total += sizes[names[end]]
            end += 1
        groups.append(names[start:end])
        start = end
    return groups


def write_safetensors_shards(folder: Path, tensors: Dict[str, object], shards: int) -> list:
    """model-0000N-of-0000M.safetensors in the tensors' order plus model.safetensors.index.json; the shard names."""
    from safetensors.torch import save_file

    names = list(tensors)
    sizes = {name: tensors[name].numel() * tensors[name].element_size() for name in names}
    weight_map, files = {}, []
    for number, group in enumerate(_contiguous_shards(names, sizes, shards), start=1):
        filename = f"model-{number:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name].contiguous() for name in group}, str(folder / filename),
                  metadata={"format": "pt"})
        weight_map.update({name: filename for name in group})
        files.append(filename)
    index = {"metadata": {"total_size": sum(sizes.values())}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return files


def build_internlm2_like_7b(folder: Path, llama_folder: Path, *, shards: int = 8,
                            rope_scaling: Optional[dict] = None, max_position_embeddings: int = 32768) -> Path:
    """The trained tiny chat Llama (tinymodel.build_chat_model) as a repo laid out like internlm2-chat-7b.

    Files: config.json (auto_map for AutoConfig/AutoModel/AutoModelForCausalLM, model_type internlm2, dynamic
    NTK RoPE with factor 2.0 as upstream; it only acts past max_position_embeddings, so the trained replies
    stay), generation_config.json (eos [2, <|im_end|>]), special_tokens_map.json, tokenizer_config.json
    (AutoTokenizer names the slow and the fast class; chat template; added_tokens_decoder), tokenizer.model
    (sentencepiece BPE with byte fallback and the identity normaliser), NO tokenizer.json, `shards`
    safetensors shards with model.safetensors.index.json, and the remote code: configuration_internlm2.py,
    modeling_internlm2.py (the oracle, which imports einops), tokenization_internlm2.py and
    tokenization_internlm2_fast.py. The weights stay float32 (upstream ships bfloat16) so that greedy
    replies do not depend on rounding.
    """
    from safetensors.torch import load_file

    internlm2_from_llama(llama_folder, folder)
    single = folder / "model.safetensors"
    tensors = load_file(str(single))
    single.unlink()
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    # Embeddings first, then layer by layer, then the final norm and the head: the order save_pretrained
    # walks InternLM2ForCausalLM in, so each shard holds neighbouring tensors as upstream's do.
    def order(name: str) -> tuple:
        if name.startswith("model.tok_embeddings."):
            return (0, 0, name)
        if name.startswith("model.layers."):
            return (1, int(name.split(".")[2]), name)
        return (2, 0 if name.startswith("model.norm.") else 1, name)

    write_safetensors_shards(folder, {name: tensors[name] for name in sorted(tensors, key=order)}, shards)

    config["auto_map"] = {"AutoConfig": "configuration_internlm2.InternLM2Config",
                          "AutoModel": "modeling_internlm2.InternLM2ForCausalLM",
                          "AutoModelForCausalLM": "modeling_internlm2.InternLM2ForCausalLM"}
    config["rope_scaling"] = dict(UPSTREAM_ROPE_SCALING if rope_scaling is None else rope_scaling)
    config["max_position_embeddings"] = max_position_embeddings
    config["initializer_range"] = 0.02
    config["transformers_version"] = "4.37.1"
    (folder / "config.json").write_text(json.dumps(dict(sorted(config.items())), indent=2) + "\n", encoding="utf-8")

    generation = {"bos_token_id": 1, "eos_token_id": [2, tinymodel_im_end_id(folder)], "pad_token_id": 2,
                  "transformers_version": "4.37.1"}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(SPECIAL_TOKENS_MAP_7B, indent=2) + "\n",
                                                    encoding="utf-8")

    path = folder / "tokenizer_config.json"
    tok_config = json.loads(path.read_text(encoding="utf-8"))
    tok_config.update({
        "auto_map": {"AutoTokenizer": ["tokenization_internlm2.InternLM2Tokenizer",
                                       "tokenization_internlm2_fast.InternLM2TokenizerFast"]},
        "model_max_length": UPSTREAM_MODEL_MAX_LENGTH, "sp_model_kwargs": None,
    })
    path.write_text(json.dumps(tok_config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (folder / "tokenization_internlm2_fast.py").write_text(TOKENIZATION_FAST_SOURCE.lstrip(), encoding="utf-8")
    (folder / "README.md").write_text(README_7B, encoding="utf-8")
    (folder / "tokenizer.json").unlink(missing_ok=True)
    return folder
