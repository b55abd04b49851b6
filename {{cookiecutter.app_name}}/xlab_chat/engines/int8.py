"""Int8 weight-only quantisation of ``nn.Linear`` for CPU inference (torch only).

Why: decoding one token on a 2-vCPU box is memory-bandwidth bound (every weight
is read once per token), so storing weights as int8 (1 byte) instead of bf16 (2)
or fp32 (4) raises tokens/s roughly in proportion, and halves/quarters RAM.

Backends, in order of preference (see ``pick_backend``):

``"int8pack"``  ``torch._weight_int8pack_mm(x_bf16, w_int8, scales_bf16)``.
    True weight-only (W8A16): activations stay bf16, so quality equals the
    dequantised-weight model. Fused kernel reads the int8 weight directly.
    Exists since torch 2.3 (CPU + MPS). On x86 only the **bf16** activation path
    is vectorised (AVX2/AVX512); fp32/fp16 activations hit a scalar loop that is
    ~50-80x slower, so this backend casts activations to bf16 and the model
    should run in bf16. The x86 kernel has no K tail and uses aligned loads, so
    it is used only when ``in_features % 16 == 0`` and the activation rows are
    32-byte aligned (we copy if not).
``"fbgemm"``    ``torch.ops.quantized.linear_dynamic`` on a per-channel packed
    weight: the kernel ``quantize_dynamic`` uses, called directly (no
    dependency on the deprecated ``torch.ao.quantization.quantize_dynamic``).
    Available in every torch we admit (>= 2.1) on x86. It is W8A8-dynamic:
    activations are quantised per tensor to 7-bit uint8 on the fly, which is
    fast but loses accuracy when activations have outlier channels (common in
    trained LLMs). Quantised-tensor constructors are themselves deprecated in
    torch >= 2.12 (warning), so this is the fallback for torch < 2.3.
``"dequant"``   ``(x @ w_int8.to(x.dtype).T) * scale``: works everywhere but is
    slower than a plain bf16 Linear (converts the weight each call); only
    saves RAM. ``supported()`` returns False when this is all we have, so the
    caller can keep bf16/fp32 instead.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional, Tuple

import torch
from torch import Tensor, nn

__all__ = [
    "quantize_weight",
    "Int8Linear",
    "pick_backend",
    "supported",
    "quantize_model_",
    "quantize_loaded_linears_",
    "int8_weight_bytes",
]

_BACKENDS = ("int8pack", "fbgemm", "dequant")
# Kept in float: the embeddings (a lookup, not a matmul). The output head is quantised too: measured on
# 2 cores, a bf16 matrix-vector product over InternLM2's 92544-row head costs as much as the rest of a
# small model, and int8 there changes greedy tokens no more than elsewhere (tests/test_int8.py).
KEEP_FLOAT = ("embed_tokens", "tok_embeddings", "wte", "word_embeddings")
_backend_cache: Optional[str] = None


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
# backend detection
# --------------------------------------------------------------------------- #
def _has_int8pack() -> bool:
    return hasattr(torch, "_weight_int8pack_mm") or hasattr(torch.ops.aten, "_weight_int8pack_mm")


def _probe(backend: str) -> bool:
    """Run a tiny matmul on ``backend`` and compare with fp32: catches missing
    ops, missing CPU kernels and wrong-result builds without trusting versions."""
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 64, generator=g)
        x = torch.randn(3, 64, generator=g)
        lin = nn.Linear(64, 48, bias=True)
        with torch.no_grad():
            lin.weight.copy_(w)
            lin.bias.copy_(torch.randn(48, generator=g))
        m = Int8Linear.from_linear(lin, backend=backend)
        with torch.no_grad(), warnings.catch_warnings():
            ref = lin(x)
            warnings.simplefilter("ignore")
            out = m(x.to(torch.bfloat16) if backend == "int8pack" else x).float()
        err = (out - ref).norm() / ref.norm()
        return bool(torch.isfinite(out).all()) and float(err) < 0.05
    except Exception:
        return False


def pick_backend() -> str:
    """Fastest quality-preserving backend that works in this process (cached)."""
    global _backend_cache
    if _backend_cache is None:
        if _has_int8pack() and _probe("int8pack"):
            _backend_cache = "int8pack"
        elif _probe("fbgemm"):
            _backend_cache = "fbgemm"
        else:
            _backend_cache = "dequant"
    return _backend_cache


def supported() -> bool:
    """True when an int8 backend faster than bf16/fp32 runs here.

    ``dequant`` alone saves RAM but is slower than bf16, so it doesn't count:
    callers should then load bf16 (or fp32) instead.
    """
    return pick_backend() in ("int8pack", "fbgemm")


def preferred_compute_dtype(backend: Optional[str] = None) -> torch.dtype:
    """Dtype the rest of the model should run in for ``backend``:
    bf16 for int8pack (its only fast activation dtype), fp32 for fbgemm
    (it takes/returns fp32), bf16 otherwise."""
    return torch.float32 if (backend or pick_backend()) == "fbgemm" else torch.bfloat16


# --------------------------------------------------------------------------- #
# module
# --------------------------------------------------------------------------- #
class Int8Linear(nn.Module):
    """Linear layer with int8 weight + per-output-channel scale (+ bias).

    Output dtype follows the input dtype. The weight is stored once: for
    ``fbgemm`` the packed fbgemm object *is* the storage (the plain int8 copy
    is dropped so RAM stays ~1 byte/param).
    """

    def __init__(
        self,
        q_weight: Tensor,
        scale: Tensor,
        bias: Optional[Tensor] = None,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        backend = backend or pick_backend()
        if backend not in _BACKENDS:
            raise ValueError(f"unknown backend {backend!r}")
        self.out_features, self.in_features = q_weight.shape
        if backend == "int8pack" and self.in_features % 16 != 0:
            backend = "fbgemm" if pick_backend() != "dequant" and _probe("fbgemm") else "dequant"
        self.backend = backend
        self.bias: Optional[Tensor]
        self.register_buffer("bias", None if bias is None else bias.detach().float().clone())
        self._packed = None
        if backend == "fbgemm":
            with warnings.catch_warnings():  # quantized-tensor ctors warn "deprecated" in torch >= 2.12
                warnings.simplefilter("ignore")
                qt = torch._make_per_channel_quantized_tensor(
                    q_weight.contiguous(), scale.double(), torch.zeros(scale.numel(), dtype=torch.long), 0
                )
                self._packed = torch.ops.quantized.linear_prepack(qt, self.bias)
            self.register_buffer("weight_int8", None)
            self.register_buffer("scale", scale.float().clone())
        else:
            # fresh, contiguous, allocator-aligned copy: the int8pack kernel uses aligned loads
            self.register_buffer("weight_int8", q_weight.contiguous().clone())
            self.register_buffer("scale", scale.float().clone())
        self._scale_cache: dict = {}
        self._bias_cache: dict = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, backend: Optional[str] = None) -> "Int8Linear":
        """Quantise an existing ``nn.Linear`` (weight may be fp32/bf16/fp16)."""
        q, s = quantize_weight(linear.weight.detach())
        return cls(q, s, None if linear.bias is None else linear.bias.detach(), backend)

    def _apply(self, fn, *args, **kwargs):  # type: ignore[override]
        """Drop dtype caches when the module is cast/moved (``model.bfloat16()``)."""
        self._scale_cache, self._bias_cache = {}, {}
        return super()._apply(fn, *args, **kwargs)

    def _scale_as(self, dtype: torch.dtype) -> Tensor:
        t = self._scale_cache.get(dtype)
        if t is None:
            t = self._scale_cache[dtype] = self.scale.to(dtype)
        return t

    def _bias_as(self, dtype: torch.dtype) -> Optional[Tensor]:
        if self.bias is None:
            return None
        t = self._bias_cache.get(dtype)
        if t is None:
            t = self._bias_cache[dtype] = self.bias.to(dtype)
        return t

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.backend == "int8pack":
            xb = x2.to(torch.bfloat16).contiguous()
            if xb.data_ptr() % 64:  # aligned loads in the AVX kernels
                xb = xb.clone()
            y = torch._weight_int8pack_mm(xb, self.weight_int8, self._scale_as(torch.bfloat16))
            if self.bias is not None:
                y = y + self._bias_as(torch.bfloat16)
            y = y.to(x.dtype)
        elif self.backend == "fbgemm":
            y = torch.ops.quantized.linear_dynamic(x2.float(), self._packed, True).to(x.dtype)
        else:
            y = (x2 @ self.weight_int8.to(x.dtype).t()) * self._scale_as(x.dtype)
            if self.bias is not None:
                y = y + self._bias_as(x.dtype)
        return y.reshape(*shape, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, bias={self.bias is not None}, backend={self.backend}"


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


def _replace(
    model: nn.Module,
    skip: Iterable[str],
    backend: Optional[str],
    predicate: Callable[[nn.Linear], bool],
) -> int:
    backend = backend or pick_backend()
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
            setattr(parent, child, Int8Linear.from_linear(mod, backend))
        mod.weight = None  # drop our reference to the float weight now (RSS)
    return len(todo)


def quantize_model_(
    model: nn.Module,
    skip: Tuple[str, ...] = KEEP_FLOAT,
    backend: Optional[str] = None,
) -> int:
    """Replace every ``nn.Linear`` (except names in ``skip`` and tied weights,
    which would otherwise be stored twice) with ``Int8Linear``, in place.
    Returns the number replaced. Cast the remaining parameters to
    ``preferred_compute_dtype(backend)`` yourself (e.g. ``model.bfloat16()``
    before or after; Int8Linear buffers are unaffected by float casts except
    scale/bias, which stay correct)."""
    return _replace(model, skip, backend, lambda m: True)


def quantize_loaded_linears_(
    model: nn.Module,
    skip: Tuple[str, ...] = KEEP_FLOAT,
    backend: Optional[str] = None,
) -> int:
    """Quantise-while-loading step: replace every ``nn.Linear`` whose weight is
    no longer on the meta device. Call after each shard's
    ``model.load_state_dict(shard, strict=False, assign=True)`` and drop the
    shard dict; peak RSS is then ~ int8 weights so far + one shard. A Linear
    whose weight and bias live in different shards is quantised only once both
    are loaded."""

    def loaded(m: nn.Linear) -> bool:
        return not m.weight.is_meta and (m.bias is None or not m.bias.is_meta)

    return _replace(model, skip, backend, loaded)


def int8_weight_bytes(model: nn.Module) -> int:
    """Bytes held by Int8Linear weights (int8 + scales), for reporting."""
    total = 0
    for m in model.modules():
        if isinstance(m, Int8Linear):
            total += m.out_features * m.in_features + m.scale.numel() * 4
    return total
