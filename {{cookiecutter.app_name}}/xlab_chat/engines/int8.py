"""Int8 weights for ``nn.Linear`` in CPU inference (torch only).

Why: decoding one token on a 2-vCPU box reads every weight once, so storing weights as int8 (1 byte) instead of
bf16 (2) or fp32 (4) raises tokens/s and halves or quarters RAM. Which kernel multiplies by them is chosen by
timing on the model's own Linears (engines/kernels.py), for decode and prefill apart: ``use_fastest_kernels_``.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch
from torch import Tensor, nn

from . import kernels

__all__ = [
    "quantize_weight",
    "Int8Linear",
    "available",
    "supported",
    "quantize_model_",
    "quantize_loaded_linears_",
    "use_kernels_",
    "use_fastest_kernels_",
    "int8_weight_bytes",
]

# Kept in float: the embeddings (a lookup, not a matmul). The output head is quantised too: measured on
# 2 cores, a bf16 matrix-vector product over InternLM2's 92544-row head costs as much as the rest of a
# small model, and int8 there changes greedy tokens no more than elsewhere (tests/test_int8.py).
KEEP_FLOAT = ("embed_tokens", "tok_embeddings", "wte", "word_embeddings")
_available: Optional[List[str]] = None


# --------------------------------------------------------------------------- #
# quantisation
# --------------------------------------------------------------------------- #
def quantize_weight(weight: Tensor, chunk_rows: int = 4096) -> Tuple[Tensor, Tensor]:
    """Symmetric per-output-channel int8: ``weight ~= q * scale[:, None]``.

    Returns ``(q int8 [N, K], scale float32 [N])``. The scale is rounded *up* to
    a bf16-representable value so the int8pack kernel (which needs bf16
    scales) uses exactly the scale we quantised with: no systematic per-channel
    gain error, |q| stays <= 127. Rows are processed in chunks so the fp32
    temporaries stay small (matters for quantise-while-loading peak RSS).
    """
    if weight.dim() != 2:
        raise ValueError(f"expected a 2-D weight, got shape {tuple(weight.shape)}")
    n, k = weight.shape
    q = torch.empty((n, k), dtype=torch.int8, device=weight.device)
    scale = torch.empty(n, dtype=torch.float32, device=weight.device)
    for s in range(0, n, chunk_rows):
        w = weight[s : s + chunk_rows].float()
        sc = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        sc_b = sc.to(torch.bfloat16).float()
        sc = torch.where(sc_b < sc, sc_b * (1.0 + 2.0 ** -7), sc_b)  # round up to bf16
        sc = sc.to(torch.bfloat16).float()
        q[s : s + chunk_rows] = torch.round(w / sc[:, None]).clamp_(-127, 127).to(torch.int8)
        scale[s : s + chunk_rows] = sc
    return q, scale


# --------------------------------------------------------------------------- #
# what runs here
# --------------------------------------------------------------------------- #
def available() -> List[str]:
    """The int8 kernels that give right results in this process, on a small weight (cached)."""
    global _available
    if _available is None:
        g = torch.Generator().manual_seed(0)
        weight = quantize_weight(torch.randn(48, 64, generator=g))
        names = [name for name in kernels.KERNELS if name != kernels.FALLBACK]
        found = []
        for name in names:
            try:
                prepared = kernels.KERNELS[name].prepare(*weight)
            except (RuntimeError, NotImplementedError, ValueError):
                continue
            if kernels.works(kernels.KERNELS[name], prepared, weight, torch.float32):
                found.append(name)
        _available = found
    return _available


def supported() -> bool:
    """True when an int8 kernel runs here; converting the weights per call alone saves RAM but is slower than
    bf16/fp32, so then callers should load the model in float instead."""
    return bool(available())


# --------------------------------------------------------------------------- #
# module
# --------------------------------------------------------------------------- #
class Int8Linear(nn.Module):
    """Linear layer with an int8 weight, a per-output-channel scale and a bias.

    One row (a decode step) runs on ``decode_kernel``, many rows (a prompt) on ``prefill_kernel``; output dtype
    follows the input. Until ``use_kernels`` it converts the weight per call (``kernels.FALLBACK``): right, slow.
    The weight is held once, unless the two kernels need two layouts (fbgemm's packed copy beside ``q``).
    """

    def __init__(self, q_weight: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> None:
        super().__init__()
        self.out_features, self.in_features = q_weight.shape
        self.weight_int8: Optional[Tensor]
        self.bias: Optional[Tensor]
        # fresh, contiguous, allocator-aligned copy: the int8pack kernel uses aligned loads
        self.register_buffer("weight_int8", q_weight.contiguous().clone())
        self.register_buffer("scale", scale.float().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self.decode_kernel = self.prefill_kernel = kernels.FALLBACK
        self._prepared: Dict[str, object] = {kernels.FALLBACK: (self.weight_int8, self.scale)}

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> "Int8Linear":
        """Quantise an existing ``nn.Linear`` (weight may be fp32/bf16/fp16)."""
        q, s = quantize_weight(linear.weight.detach())
        return cls(q, s, None if linear.bias is None else linear.bias.detach())

    def int8_weight(self) -> Tensor:
        """``q`` as stored, or unpacked from fbgemm's copy when that is the only one kept."""
        if self.weight_int8 is not None:
            return self.weight_int8
        return kernels.fbgemm_unpack(self._prepared["fbgemm"])

    def use_kernels(self, decode: str, prefill: str) -> None:
        """Lay the weight out for these kernels; ``q`` is dropped when neither reads it."""
        q = self.int8_weight()
        names = {decode, prefill}
        self._prepared = {name: kernels.KERNELS[name].prepare(q, self.scale) for name in names}
        self.weight_int8 = None if all(kernels.KERNELS[name].own_copy for name in names) else q
        self.decode_kernel, self.prefill_kernel = decode, prefill

    def forward(self, x: Tensor) -> Tensor:
        x2 = x.reshape(-1, self.in_features)
        name = self.prefill_kernel if x2.shape[0] >= kernels.MANY_ROWS else self.decode_kernel
        y = kernels.KERNELS[name].run(x2, self._prepared[name])
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.to(x.dtype).reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, "
                f"decode={self.decode_kernel}, prefill={self.prefill_kernel}")


# --------------------------------------------------------------------------- #
# model-level helpers
# --------------------------------------------------------------------------- #
def _skipped(name: str, skip: Iterable[str]) -> bool:
    parts = name.split(".")
    return any(s in parts or name.endswith(s) for s in skip)


def _tied_param_ids(model: nn.Module) -> set:
    seen: dict = {}
    for _, p in model.named_parameters(remove_duplicate=False):
        seen[id(p)] = seen.get(id(p), 0) + 1
    return {k for k, v in seen.items() if v > 1}


def _replace(model: nn.Module, skip: Iterable[str], predicate: Callable[[nn.Linear], bool]) -> int:
    tied = _tied_param_ids(model)
    todo = [
        (name, mod)
        for name, mod in model.named_modules()
        if type(mod) is nn.Linear and not _skipped(name, skip) and id(mod.weight) not in tied and predicate(mod)
    ]
    for name, mod in todo:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        with torch.no_grad():
            setattr(parent, child, Int8Linear.from_linear(mod))
        mod.weight = None  # drop our reference to the float weight now (RSS)
    return len(todo)


def quantize_model_(model: nn.Module, skip: Tuple[str, ...] = KEEP_FLOAT) -> int:
    """Replace every ``nn.Linear`` (except names in ``skip`` and tied weights,
    which would otherwise be stored twice) with ``Int8Linear``, in place.
    Returns the number replaced. Then choose the kernels: ``use_fastest_kernels_``."""
    return _replace(model, skip, lambda m: True)


def quantize_loaded_linears_(model: nn.Module, skip: Tuple[str, ...] = KEEP_FLOAT) -> int:
    """Quantise-while-loading step: replace every ``nn.Linear`` whose weight is
    no longer on the meta device. Call after each shard's
    ``model.load_state_dict(shard, strict=False, assign=True)`` and drop the
    shard dict; peak RSS is then ~ int8 weights so far + one shard. A Linear
    whose weight and bias live in different shards is quantised only once both
    are loaded."""

    def loaded(m: nn.Linear) -> bool:
        return not m.weight.is_meta and (m.bias is None or not m.bias.is_meta)

    return _replace(model, skip, loaded)


def _int8_linears(model: nn.Module) -> List[Int8Linear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


def use_kernels_(model: nn.Module, decode: str, prefill: str) -> None:
    """Run every Int8Linear on these kernels (a choice, or a benchmark's or test's fixed pair)."""
    for linear in _int8_linears(model):
        linear.use_kernels(decode, prefill)


def use_fastest_kernels_(model: nn.Module, dtype: torch.dtype) -> Tuple[kernels.Choice, float]:
    """Time the kernels that run here on the model's own int8 weights, with activations in ``dtype``, and use the
    fastest for each phase. Returns the choice and the seconds the timing took (for the log line)."""
    linears = _int8_linears(model)
    weights = [(linear.int8_weight(), linear.scale) for linear in linears]
    choice, seconds = kernels.time_and_choose(weights, dtype, available())
    use_kernels_(model, choice.decode, choice.prefill)
    return choice, seconds


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes of int8 weights (int8 + scales) that one decode step reads, for reporting."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.out_features * m.in_features + m.scale.numel() * 4
    return total
