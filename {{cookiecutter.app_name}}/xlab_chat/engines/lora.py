"""Merge a peft/XTuner LoRA adapter into InternLM2 weights in memory, shard by shard, before renaming to Llama.

The native loader calls it after each ``_read_shard`` and before ``convert_state_dict``::

    adapter = load_adapter(adapter_folder, base_config)          # validates config and shapes
    applied = {}
    for path in shard_files:
        part = read_shard(path, dtype)
        applied.update(merge_into(part, adapter))                 # only keys present in this shard
        part = convert_state_dict(part, base_config)
        ...
    assert_all_applied(adapter, applied)

Merging into the packed ``wqkv`` before the q/k/v split is exact (see ``merge_into``). Imports: torch and stdlib;
the validation rules are shared with the stdlib-only ``model/adapter.py`` (the repo check uses that alone).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import torch

from ..model.adapter import (  # the stdlib rules the repo check uses too
    AdapterConfig,
    AdapterError,
    adapter_weights_file,
    check_adapter_shapes,
    group_adapter_keys,
    parse_adapter_config,
    read_adapter_config,
)
from .safetensors_file import read_safetensors

__all__ = [
    "Adapter", "AdapterConfig", "AdapterError", "LoraUpdate", "assert_all_applied", "check_shapes", "delta_weight",
    "load_adapter", "merge_into", "parse_adapter_config", "prepare_adapter", "read_adapter_config",
    "read_adapter_weights",
]

_FIX = "re-export the adapter with `xtuner convert pth_to_hf` (or peft's save_pretrained)"


def read_adapter_weights(folder: Path) -> Dict[str, torch.Tensor]:
    """The saved adapter tensors by their saved names: adapter_model.safetensors (read as the loader reads its
    shards) or else adapter_model.bin (``torch.load(weights_only=True)``)."""
    path = adapter_weights_file(Path(folder))
    if path.suffix == ".safetensors":
        try:
            return read_safetensors(path)  # the loader's own reader: no memory map
        except AdapterError:
            raise
        except ValueError as exc:  # the app's reader raises ValueError with its own fix
            raise AdapterError(str(exc)) from None
    try:
        tensors = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle errors come in many types
        raise AdapterError(f"{path.name} could not be read safely ({type(exc).__name__}: {exc}); {_FIX}, "
                           f"preferably as safetensors.") from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise AdapterError(f"{path.name} is not a flat dict of tensors; {_FIX}.")
    return dict(tensors)


@dataclass
class LoraUpdate:
    """What one adapter entry does to one base tensor: optional replacement first, then optional ``scale * B @ A``
    (or the lora_B bias) added."""
    replace: Optional[torch.Tensor] = None
    lora_A: Optional[torch.Tensor] = None
    lora_B: Optional[torch.Tensor] = None
    add: Optional[torch.Tensor] = None  # lora_B.bias (lora_bias=True), added times scale
    scale: float = 1.0
    embedding: bool = False


@dataclass
class Adapter:
    config: AdapterConfig
    updates: Dict[str, LoraUpdate]  # InternLM2 tensor name ("...wqkv.weight") -> what to do to it
    notes: List[str] = field(default_factory=list)


def prepare_adapter(config: AdapterConfig, tensors: Mapping[str, torch.Tensor]) -> Adapter:
    """Map saved adapter keys to the InternLM2 tensor names they change, with each module's scale."""
    updates: Dict[str, LoraUpdate] = {}
    notes: List[str] = []
    if config.fan_in_fan_out:
        # peft forces fan_in_fan_out=False on nn.Linear targets (warning "Setting fan_in_fan_out to False"), and
        # every InternLM2 target is an nn.Linear; so does this merge, to compute exactly what peft would.
        notes.append("adapter_config.json says fan_in_fan_out=true; ignored as peft does for nn.Linear layers")
    for module, entry in group_adapter_keys(list(tensors)).items():
        if "lora_A" in entry or "emb_A" in entry:
            embedding = "emb_A" in entry
            a = tensors[entry["emb_A" if embedding else "lora_A"]]
            b = tensors[entry["emb_B" if embedding else "lora_B"]]
            r, _ = config.rank_and_alpha(module)
            if a.shape[0] != r or b.shape[1] != r:
                raise AdapterError(f"{module}: LoRA weights have rank {a.shape[0]}/{b.shape[1]} but "
                                   f"adapter_config.json says r={r}; use the adapter_config.json saved with these "
                                   f"weights.")
            scale = config.scale(module)
            upd = updates.setdefault(module + ".weight", LoraUpdate())
            upd.lora_A, upd.lora_B, upd.scale, upd.embedding = a, b, scale, embedding
            if "lora_B_bias" in entry:
                updates.setdefault(module + ".bias", LoraUpdate()).add = tensors[entry["lora_B_bias"]]
                updates[module + ".bias"].scale = scale
        for kind in ("weight", "bias"):
            if kind in entry:
                updates.setdefault(f"{module}.{kind}", LoraUpdate()).replace = tensors[entry[kind]]
    return Adapter(config, updates, notes)


def check_shapes(adapter_tensors: Mapping[str, torch.Tensor], config: Mapping[str, object],
                 adapter_config: Optional[AdapterConfig] = None) -> List[str]:
    """Problems with the adapter's tensor shapes against the InternLM2 base config.json (empty list: fits)."""
    return check_adapter_shapes({k: tuple(t.shape) for k, t in adapter_tensors.items()}, config, adapter_config)


def load_adapter(folder: Path, base_config: Optional[Mapping[str, object]] = None) -> Adapter:
    """Read, validate (config; shapes when base_config is given) and prepare an adapter folder."""
    config = read_adapter_config(Path(folder))
    tensors = read_adapter_weights(Path(folder))
    if base_config is not None:
        problems = check_shapes(tensors, base_config, config)
        if problems:
            shown = "\n  ".join(problems[:8]) + (f"\n  ... and {len(problems) - 8} more" if len(problems) > 8 else "")
            raise AdapterError(f"The adapter in {folder} does not fit the base model:\n  {shown}")
    return prepare_adapter(config, tensors)


def delta_weight(lora_A: torch.Tensor, lora_B: torch.Tensor, scale: float, fan_in_fan_out: bool = False,
                 embedding: bool = False) -> torch.Tensor:
    """scale * B @ A in float32, laid out like the weight (transposed for embeddings and fan_in_fan_out weights)."""
    delta = (lora_B.float() @ lora_A.float()) * scale
    return delta.T if (embedding or fan_in_fan_out) else delta


def merge_into(tensors: Dict[str, torch.Tensor], adapter: Adapter) -> Dict[str, str]:
    """Apply the adapter, in place, to the InternLM2-named tensors of one shard; returns {tensor name: action}.

    Only names present in ``tensors`` are touched, so call it once per shard and pass the union of the returned
    dicts to ``assert_all_applied``. The result keeps each tensor's dtype; the sum is formed in float32.

    Packed wqkv: the later split takes fixed rows, i.e. left-multiplies by a row-selection matrix S, and
    S(W + s*B@A) = S@W + s*(S@B)@A: merging then splitting equals splitting B's rows the same way and merging.
    """
    applied: Dict[str, str] = {}
    for name in [n for n in adapter.updates if n in tensors]:
        upd, base = adapter.updates[name], tensors[name]
        out = base.float()
        actions = []
        if upd.replace is not None:
            if tuple(upd.replace.shape) != tuple(base.shape):
                raise AdapterError(f"The adapter's saved {name} has shape {tuple(upd.replace.shape)}, the base has "
                                   f"{tuple(base.shape)}; the adapter does not fit this base model.")
            out = upd.replace.float().clone()
            actions.append("replaced")
        if upd.lora_A is not None:
            delta = delta_weight(upd.lora_A, upd.lora_B, upd.scale, embedding=upd.embedding)  # type: ignore[arg-type]
            if tuple(delta.shape) != tuple(base.shape):
                raise AdapterError(f"LoRA update for {name} has shape {tuple(delta.shape)}, the base weight has "
                                   f"{tuple(base.shape)}; the adapter does not fit this base model.")
            out = out + delta
            actions.append("lora")
        if upd.add is not None:
            out = out + upd.add.float() * upd.scale
            actions.append("lora_bias")
        if not torch.isfinite(out).all():
            raise AdapterError(f"Merging the adapter into {name} gives NaN or infinite values; the adapter is broken.")
        tensors[name] = out.to(base.dtype)
        applied[name] = "+".join(actions)
    return applied


def assert_all_applied(adapter: Adapter, applied: Iterable[str]) -> None:
    """After the last shard: every adapter update must have found its base tensor."""
    missing = sorted(set(adapter.updates) - set(applied))
    if missing:
        shown = ", ".join(missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise AdapterError(f"{len(missing)} adapter updates found no base weight ({shown}); the adapter was made "
                           f"for a different base model (adapter: {adapter.config.base_model_name_or_path!r}) or "
                           f"the base checkpoint is incomplete.")


def merge_into_model(model: torch.nn.Module, adapter: Adapter) -> None:
    """Merge into a model loaded by transformers (remote code or a Llama base), parameter by parameter, in place."""
    applied: Dict[str, str] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():  # one at a time: at most one extra weight in memory
            if name in adapter.updates:
                one = {name: param.data}
                applied.update(merge_into(one, adapter))
                param.data.copy_(one[name])
    assert_all_applied(adapter, applied)
