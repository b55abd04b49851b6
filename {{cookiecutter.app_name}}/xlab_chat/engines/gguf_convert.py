"""Write a Hugging Face InternLM2 or Llama checkpoint as one GGUF file, without torch.

engine=llamacpp runs GGUF files. llama.cpp's own converter (convert_hf_to_gguf.py) is not in any wheel and
needs torch, so the app writes the file itself with the ``gguf`` package (llama.cpp's GGUF writer, on PyPI),
following that converter's rules for these two architectures (checked against it in
tests/test_llamacpp_convert.py): InternLM2's packed ``wqkv`` is split into q, k and v, q and k rows are
permuted into llama.cpp's rotary order, 1-D tensors are float32, and a chat model's ``<|im_end|>`` becomes
its end-of-sequence token. Weights keep their dtype (bfloat16 stays bfloat16); llama.cpp's quantizer
makes the 4- or 8-bit file from this one (engines/llamacpp.py).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import gguf
import numpy as np

from ..model.llamacpp_check import ADD_GGUF, CONVERTED_ARCHITECTURES

ARCHITECTURES = dict(zip(CONVERTED_ARCHITECTURES, (gguf.MODEL_ARCH.INTERNLM2, gguf.MODEL_ARCH.LLAMA)))
SAFETENSORS_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}  # bfloat16 kept as raw bits
IM_END = "<|im_end|>"
DRAGON = "🐉".encode("utf-8")  # llama.cpp's converter writes InternLM2's "\x00" piece so (C++ would read "")


class ConversionError(ValueError):
    """The checkpoint cannot be converted here; the message says why and what to do instead."""


def read_config(folder: Path) -> dict:
    try:
        return json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(f"config.json cannot be read ({error})") from None


def architecture(config: dict) -> "gguf.MODEL_ARCH":
    name = (config.get("architectures") or [""])[0]
    if name not in ARCHITECTURES:
        raise ConversionError(f"the model is a {name or 'model of unknown architecture'}, and the app converts"
                              f" {' and '.join(ARCHITECTURES)} only — {ADD_GGUF}")
    scaling = config.get("rope_scaling") or {}
    if scaling.get("type", scaling.get("rope_type", "dynamic")) != "dynamic":  # llama.cpp ignores dynamic NTK
        raise ConversionError(f"rope_scaling {scaling} is not converted — {ADD_GGUF}")
    return ARCHITECTURES[name]


# ---------------------------------------------------------------- weights


def safetensors_tensors(path: Path) -> Iterator[Tuple[str, np.ndarray]]:
    """Each tensor of a .safetensors file as a read-only memory map (the format: an 8-byte header length,
    a JSON header of dtype, shape and byte offsets, then the raw little-endian data)."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        header = json.loads(handle.read(length))
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + length)
    for name, info in header.items():
        if name == "__metadata__":
            continue
        if info["dtype"] not in SAFETENSORS_DTYPES:
            raise ConversionError(f"{path.name}: tensor {name} is {info['dtype']}, not a float the app converts")
        start, end = info["data_offsets"]
        yield name, data[start:end].view(SAFETENSORS_DTYPES[info["dtype"]]).reshape(info["shape"])


def torch_bin_tensors(path: Path) -> Iterator[Tuple[str, np.ndarray]]:
    """pytorch_model*.bin files are torch pickles: readable only with torch, which engine=llamacpp does not
    install, so a repo in that form needs torch beside it (or safetensors weights)."""
    try:
        import torch
    except ImportError:
        raise ConversionError(f"{path.name} is a torch .bin file and torch is not installed — install torch"
                              " (`pip install torch`), or upload the weights as .safetensors") from None
    state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    for name, tensor in state.items():
        if tensor.dtype == torch.bfloat16:
            yield name, tensor.view(torch.int16).numpy().view(np.uint16)
        else:
            yield name, (tensor if tensor.dtype in (torch.float16, torch.float32) else tensor.float()).numpy()


def weight_files(folder: Path) -> List[Path]:
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if not files:
        raise ConversionError("the model folder has no .safetensors or pytorch_model*.bin weights")
    return files


def checkpoint_tensors(folder: Path) -> Iterator[Tuple[str, np.ndarray]]:
    for path in weight_files(folder):
        yield from (safetensors_tensors(path) if path.suffix == ".safetensors" else torch_bin_tensors(path))


def to_float32(array: np.ndarray) -> np.ndarray:
    if array.dtype == np.uint16:  # bfloat16 bits: the high half of a float32
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array.astype(np.float32)


def rotary_permute(weights: np.ndarray, heads: int) -> np.ndarray:
    """q/k rows from Hugging Face's rotate-half layout to llama.cpp's interleaved pairs (as its converter)."""
    return weights.reshape(heads, 2, weights.shape[0] // heads // 2, *weights.shape[1:]).swapaxes(1, 2) \
        .reshape(weights.shape)


def gguf_tensors(config: dict, arch: "gguf.MODEL_ARCH", tensors: Iterator[Tuple[str, np.ndarray]]
                 ) -> Iterator[Tuple[str, np.ndarray]]:
    """(GGUF name, array) for every checkpoint tensor, split and permuted as llama.cpp expects."""
    heads, kv_heads = config["num_attention_heads"], config.get("num_key_value_heads") or config["num_attention_heads"]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    names = gguf.get_tensor_name_map(arch, layers)
    for name, array in tensors:
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if ".attention.wqkv." in name:  # InternLM2: per kv head [g queries, 1 key, 1 value], head_dim rows each
            groups, head_dim = heads // kv_heads, hidden // heads
            packed = np.asarray(array).reshape(kv_heads, groups + 2, head_dim, *array.shape[1:])
            block = name.split(".")[2]
            suffix = name.rsplit(".", 1)[1]
            parts = {"attn_q": rotary_permute(packed[:, :groups].reshape(-1, *array.shape[1:]), heads),
                     "attn_k": rotary_permute(packed[:, -2].reshape(-1, *array.shape[1:]), kv_heads),
                     "attn_v": packed[:, -1].reshape(-1, *array.shape[1:])}
            for part, value in parts.items():
                yield from _typed(f"blk.{block}.{part}.{suffix}", value)
            continue
        if arch == gguf.MODEL_ARCH.LLAMA and (".q_proj." in name or ".k_proj." in name):
            array = rotary_permute(np.asarray(array), heads if ".q_proj." in name else kv_heads)
        mapped = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConversionError(f"the weight {name} has no place in a {gguf.MODEL_ARCH_NAMES[arch]} GGUF")
        yield from _typed(mapped, array)


def _typed(name: str, array: np.ndarray) -> Iterator[Tuple[str, np.ndarray]]:
    yield name, to_float32(array) if array.ndim < 2 else np.ascontiguousarray(array)


# ---------------------------------------------------------------- tokenizer


def sentencepiece_vocab(folder: Path, config: dict, internlm2: bool) -> Tuple[List[bytes], List[float], List[int],
                                                                               int]:
    """(tokens, scores, types, id of <|im_end|> or -1), as llama.cpp's converter builds them from tokenizer.model
    and the added tokens of tokenizer_config.json and tokenizer.json."""
    from sentencepiece import SentencePieceProcessor

    path = folder / "tokenizer.model"
    if not path.is_file():
        raise ConversionError("the model has no tokenizer.model (sentencepiece), which the app's GGUF converter"
                              f" reads — {ADD_GGUF}")
    processor = SentencePieceProcessor(model_file=str(path))
    size = config.get("vocab_size") or processor.vocab_size()
    tokens = [f"[PAD{i}]".encode("utf-8") for i in range(size)]
    scores, types = [-10000.0] * size, [gguf.TokenType.UNUSED] * size
    for token_id in range(min(size, processor.vocab_size())):
        piece = processor.IdToPiece(token_id)
        kind = gguf.TokenType.NORMAL
        for test, token_type in ((processor.IsUnknown, gguf.TokenType.UNKNOWN),
                                 (processor.IsControl, gguf.TokenType.CONTROL),
                                 (processor.IsUnused, gguf.TokenType.UNUSED), (processor.IsByte, gguf.TokenType.BYTE)):
            if test(token_id):
                kind = token_type
                break
        text = piece.encode("utf-8")
        if internlm2 and text == b"\x00":
            text = DRAGON
        if internlm2 and piece.startswith("[UNUSED"):
            kind = gguf.TokenType.UNUSED
        tokens[token_id], scores[token_id], types[token_id] = text, processor.GetScore(token_id), kind
    im_end = -1
    for token_id, content, special in _added_tokens(folder, internlm2):
        if token_id >= size:
            continue
        if content == IM_END:
            im_end = token_id
        if special or (not internlm2 and _looks_special(content)):
            types[token_id] = gguf.TokenType.CONTROL
        else:
            types[token_id] = gguf.TokenType.USER_DEFINED
            content = content if internlm2 else content.replace("\u2581", " ")
        tokens[token_id], scores[token_id] = content.encode("utf-8"), -1000.0
    return tokens, scores, types, im_end


def _added_tokens(folder: Path, internlm2: bool) -> Iterator[Tuple[int, str, bool]]:
    """tokenizer_config.json's added tokens; InternLM2's converter reads tokenizer.json's too."""
    sources = (("tokenizer_config.json", "added_tokens_decoder"),) + ((("tokenizer.json", "added_tokens"),)
                                                                      if internlm2 else ())
    for name, key in sources:
        try:
            data = json.loads((folder / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        entries = data.get(key) or {}
        items = entries.items() if isinstance(entries, dict) else ((item.get("id"), item) for item in entries)
        for token_id, entry in items:
            yield int(token_id), entry["content"], bool(entry.get("special"))


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter makes control tokens even when not marked special."""
    wrapped = any(text.startswith(start) and text.endswith(end)
                  for start, end in (("<|", "|>"), ("<\uff5c", "\uff5c>"), ("<unused", ">")))
    return wrapped or text in ("<pad>", "<mask>", "<2mass>", "[@BOS@]")


# ---------------------------------------------------------------- the file


def convert(folder: Path, out: Path) -> Path:
    """Write folder's checkpoint to out as a GGUF with the weights' own float type."""
    config = read_config(folder)
    arch = architecture(config)
    internlm2 = arch == gguf.MODEL_ARCH.INTERNLM2
    writer = gguf.GGUFWriter(str(out), gguf.MODEL_ARCH_NAMES[arch])
    heads = config["num_attention_heads"]
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(folder.name)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(config.get("num_key_value_heads") or heads)
    rope = config.get("rope_parameters") or {}
    writer.add_rope_freq_base(float(config.get("rope_theta") or rope.get("rope_theta") or 10000.0))
    writer.add_layer_norm_rms_eps(config.get("rms_norm_eps", 1e-6))
    if config.get("head_dim"):
        writer.add_key_length(config["head_dim"])
        writer.add_value_length(config["head_dim"])
    if not internlm2:
        writer.add_vocab_size(config["vocab_size"])
        writer.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // heads)

    tokens, scores, types, im_end = sentencepiece_vocab(folder, config, internlm2)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if internlm2:
        from sentencepiece import sentencepiece_model_pb2

        proto = sentencepiece_model_pb2.ModelProto()
        proto.ParseFromString((folder / "tokenizer.model").read_bytes())
        writer.add_add_space_prefix(proto.normalizer_spec.add_dummy_prefix)
    special = gguf.SpecialVocab(folder, n_vocab=len(tokens))
    if internlm2 and im_end >= 0:  # a chat model ends its turn with <|im_end|>, as llama.cpp's converter has it
        special.special_token_ids["eos"] = im_end
    special.add_to_gguf(writer)

    kinds = set()
    for name, array in gguf_tensors(config, arch, checkpoint_tensors(folder)):
        raw = gguf.GGMLQuantizationType.BF16 if array.dtype == np.uint16 else None
        if array.ndim >= 2:
            kinds.add(array.dtype)
        writer.add_tensor(name, array, raw_dtype=raw)
    writer.add_file_type(FILE_TYPES[max(kinds, key=lambda kind: np.dtype(kind).itemsize)] if kinds else
                         gguf.LlamaFileType.ALL_F32)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


FILE_TYPES: Dict[object, "gguf.LlamaFileType"] = {
    np.dtype(np.float32): gguf.LlamaFileType.ALL_F32,
    np.dtype(np.float16): gguf.LlamaFileType.MOSTLY_F16,
    np.dtype(np.uint16): gguf.LlamaFileType.MOSTLY_BF16,
}
