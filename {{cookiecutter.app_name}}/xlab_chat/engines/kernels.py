"""The CPU's int8 matmul kernels, and the choice between them by timing them on the model's own Linears.

Why timing: which kernel is fastest depends on the CPU, not on the torch version. On 2 cores of an AVX2-only EPYC,
int8pack with bf16 activations decoded a 1.8B model at 4.58 tok/s and prefilled slower than fp32 (16.1 against 28.5
tok/s), while fbgemm gave 7.02 and 51.6; on an AVX-512 BF16 machine int8pack was the fastest. A kernel that is fast
for one row may be slow for 500, so decode (one row) and prefill (many rows) are timed and chosen separately.

Every kernel reads the same int8 weight (symmetric, per output channel): ``q int8 [N, K]`` and ``scale float32 [N]``.
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

Weight = Tuple[Tensor, Tensor]  # q int8 [N, K], scale float32 [N]
MANY_ROWS = 16  # a call with this many rows or more is a prefill and uses the prefill kernel
PREFILL_ROWS = 256  # rows per call when timing prefill: a short chat's prompt, long enough to amortise a conversion
DECODE_SAMPLE_BYTES = 256 * 2**20  # more than any CPU cache, so decode timings read weights from memory as a step does
PREFILL_SAMPLE_BYTES = 32 * 2**20  # half a layer of a 1.8B model; prefill is bound by arithmetic, not memory
FALLBACK = "float"  # right everywhere, fast nowhere: what runs before a choice, or when no int8 kernel does
TURN = (1000, 128)  # prompt and reply tokens: how the choice weighs the two phases against each other
SPLIT_GAIN = 0.1  # a second weight layout (about 1 byte per parameter more) must save this share of a turn


def _aligned(x: Tensor) -> Tensor:
    """int8pack's AVX kernels use aligned loads."""
    x = x.contiguous()
    return x.clone() if x.data_ptr() % 64 else x


def _fbgemm_prepare(q: Tensor, scale: Tensor) -> object:
    with warnings.catch_warnings():  # quantised-tensor constructors warn "deprecated" in torch >= 2.12
        warnings.simplefilter("ignore")
        qt = torch._make_per_channel_quantized_tensor(q.contiguous(), scale.double(),
                                                      torch.zeros(scale.numel(), dtype=torch.long), 0)
        return torch.ops.quantized.linear_prepack(qt, None)


def fbgemm_unpack(packed: object) -> Tensor:
    """The int8 weight back out of fbgemm's packed copy, so q need not be kept beside it."""
    return torch.ops.quantized.linear_unpack(packed)[0].int_repr()


def _per_token(x: Tensor, w: Weight) -> Tensor:
    """W8A8 with one scale per activation row: int8 x int8 -> int32 (oneDNN), then both scales."""
    qt, scale = w
    x = x.float()
    step = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
    return torch._int_mm(torch.round(x / step).to(torch.int8), qt).float() * step * scale


@dataclass(frozen=True)
class Kernel:
    """One way to multiply activations ``x [M, K]`` (the model's float dtype) by an int8 weight."""

    name: str
    prepare: Callable[[Tensor, Tensor], object]  # the weight as this kernel reads it, from (q, scale)
    run: Callable[[Tensor, object], Tensor]
    own_copy: bool = False  # prepare() makes a copy of the weight, so q is dropped when no other kernel needs it
    one_row: bool = True  # a candidate for decode
    many_rows: bool = True  # a candidate for prefill
    fits: Callable[[int], bool] = lambda in_features: True


KERNELS: Dict[str, Kernel] = {kernel.name: kernel for kernel in (
    # W8A8, activations quantised per tensor to 7 bits on the fly: the kernel torch's quantize_dynamic uses.
    Kernel("fbgemm", _fbgemm_prepare, lambda x, packed: torch.ops.quantized.linear_dynamic(x.float(), packed, True),
           own_copy=True),
    # W8A16: activations stay bf16; the x86 kernel has no K tail, hence in_features % 16.
    Kernel("int8pack", lambda q, s: (q, s.to(torch.bfloat16)),
           lambda x, w: torch._weight_int8pack_mm(_aligned(x.to(torch.bfloat16)), *w),
           fits=lambda in_features: in_features % 16 == 0),
    # The same with fp32 activations: one row only, its many-row path is a scalar loop (44x slower than bf16 at 256
    # rows, measured here), so it is never timed for prefill.
    Kernel("int8pack-fp32", lambda q, s: (q, s.float()),
           lambda x, w: torch._weight_int8pack_mm(_aligned(x.float()), *w),
           many_rows=False, fits=lambda in_features: in_features % 16 == 0),
    Kernel("per-token", lambda q, s: (q.t(), s.float()), _per_token),
    # The unquantised matmul in the model's dtype, the weight converted per call: no second copy in RAM, and over
    # many rows the conversion costs little, so prefill is never slower than without int8 by more than that. For
    # one row the conversion costs more than the matmul, so it decodes only when nothing else runs.
    Kernel("float", lambda q, s: (q, s), lambda x, w: (x @ w[0].to(x.dtype).t()) * w[1].to(x.dtype),
           one_row=False),
)}


@dataclass(frozen=True)
class Choice:
    """The kernel for each phase and the timings it was chosen by (estimated ms per token for all the Linears)."""

    decode: str
    prefill: str
    decode_ms: Dict[str, float]
    prefill_ms: Dict[str, float]
    extra_bytes: int = 0  # RAM for a second copy of the weights, when the two phases' kernels need two layouts
    note: str = ""

    @property
    def label(self) -> str:
        """What runs, for the page header."""
        return self.decode if self.decode == self.prefill else f"{self.decode}, prefill {self.prefill}"

    def log_line(self, seconds: float) -> str:
        def row(timings: Dict[str, float]) -> str:
            return ", ".join(f"{name} {ms:.3g}" for name, ms in sorted(timings.items(), key=lambda item: item[1]))

        copy = f"; +{self.extra_bytes / 1e9:.2f} GB for a second weight layout" if self.extra_bytes else ""
        note = f"; {self.note}" if self.note else ""
        return (f"[engine] int8 kernels: decode {self.decode}, prefill {self.prefill}{copy}{note} (timed in "
                f"{seconds:.1f} s on the model's Linears, ms per token: decode {row(self.decode_ms)}; prefill "
                f"{row(self.prefill_ms)})")


def _turn_ms(decode_ms: Dict[str, float], prefill_ms: Dict[str, float], pair: Tuple[str, str]) -> float:
    return TURN[1] * decode_ms[pair[0]] + TURN[0] * prefill_ms[pair[1]]


def _two_layouts(pair: Tuple[str, str]) -> bool:
    """fbgemm reads its own packed copy, every other kernel reads q: a pair mixing them keeps both."""
    return pair[0] != pair[1] and KERNELS[pair[0]].own_copy != KERNELS[pair[1]].own_copy


def choose(decode_ms: Dict[str, float], prefill_ms: Dict[str, float], second_copy_bytes: int,
           available_bytes: Optional[int]) -> Choice:
    """The fastest kernel for each phase, among those that prefill no slower than the float matmul.

    A pair that needs two weight layouts is taken only when the second fits in half the free RAM and saves at least
    ``SPLIT_GAIN`` of a turn's time (``TURN``) over the best pair that needs one; else that one-layout pair runs.
    """
    if not decode_ms or FALLBACK not in prefill_ms:
        return Choice(FALLBACK, FALLBACK, decode_ms, prefill_ms, note="no int8 kernel runs here")
    prefills = [name for name, ms in prefill_ms.items() if ms <= prefill_ms[FALLBACK]]
    pairs = [(decode, prefill) for decode in decode_ms for prefill in prefills]
    # one layout: among the pairs above, or (fbgemm alone running here) any prefill kernel
    singles = [pair for pair in pairs if not _two_layouts(pair)] or [
        (decode, prefill) for decode in decode_ms for prefill in prefill_ms if not _two_layouts((decode, prefill))]
    best, single = (min(options, key=lambda pair: _turn_ms(decode_ms, prefill_ms, pair))
                    for options in (pairs, singles))
    if not _two_layouts(best):
        return Choice(*best, decode_ms, prefill_ms)
    if _turn_ms(decode_ms, prefill_ms, best) > (1 - SPLIT_GAIN) * _turn_ms(decode_ms, prefill_ms, single):
        return Choice(*single, decode_ms, prefill_ms, note=f"{'+'.join(best)} would save under "
                      f"{SPLIT_GAIN:.0%} for a second weight layout")
    if available_bytes is None or second_copy_bytes > available_bytes // 2:
        return Choice(*single, decode_ms, prefill_ms, note=f"{'+'.join(best)} needs a second weight layout, "
                      "which does not fit in the free RAM")
    return Choice(*best, decode_ms, prefill_ms, second_copy_bytes)


def available_memory() -> Optional[int]:
    """MemAvailable in bytes where the system says (Linux), else None."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _sample(weights: Sequence[Weight], budget: int) -> List[Weight]:
    """The first weights in model order up to ``budget`` bytes (at least one)."""
    taken, total = [], 0
    for weight in weights:
        if taken and total + weight[0].numel() > budget:
            break
        taken.append(weight)
        total += weight[0].numel()
    return taken


def works(kernel: Kernel, prepared: object, weight: Weight, dtype: torch.dtype) -> bool:
    """Right result on this weight, against the dequantised fp32 matmul: catches missing ops and wrong builds."""
    q, scale = weight
    x = torch.randn(3, q.shape[1], generator=torch.Generator().manual_seed(0)).to(dtype)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = kernel.run(x, prepared).float()
    except (RuntimeError, NotImplementedError):
        return False
    ref = x.float() @ (q.float() * scale.float()[:, None]).t()
    return bool(torch.isfinite(out).all()) and float((out - ref).norm() / ref.norm().clamp_min(1e-12)) < 0.05


def _time(calls: Dict[str, List[Callable[[], object]]], rounds: int) -> Dict[str, float]:
    """Median seconds of each kernel's calls over ``rounds``, after a warm-up round; kernels alternate in each round
    (their order rotating) so a busy neighbour slows them all alike."""
    runs: Dict[str, List[float]] = {name: [] for name in calls}
    names = list(calls)
    for round_ in range(rounds + 1):
        for name in names[round_ % len(names):] + names[:round_ % len(names)]:
            start = time.perf_counter()
            for call in calls[name]:
                call()
            runs[name].append(time.perf_counter() - start)
    return {name: statistics.median(seconds[1:]) for name, seconds in runs.items()}


def measure(weights: Sequence[Weight], dtype: torch.dtype, names: Sequence[str] = tuple(KERNELS), rounds: int = 3
            ) -> Tuple[Dict[str, float], Dict[str, float]]:
    """Estimated ms per token over all ``weights`` for each kernel that runs them right, at one row and at many.

    Decode runs over the first 256 MiB of weights, so timings include reading them from memory; prefill over the
    first 32 MiB at 256 rows. Both are scaled to the whole model by its share of the weights.
    """
    decode_sample = _sample(weights, DECODE_SAMPLE_BYTES)
    prefill_sample = decode_sample[:len(_sample(weights, PREFILL_SAMPLE_BYTES))]
    total = sum(q.numel() for q, _ in weights)
    candidates = [KERNELS[name] for name in names
                  if all(KERNELS[name].fits(q.shape[1]) for q, _ in weights)]
    decode_calls: Dict[str, List[Callable[[], object]]] = {}
    prefill_calls: Dict[str, List[Callable[[], object]]] = {}
    generator = torch.Generator().manual_seed(0)
    for kernel in candidates:
        try:
            prepared = [kernel.prepare(q, scale) for q, scale in decode_sample]
        except (RuntimeError, NotImplementedError, ValueError):
            continue
        if not works(kernel, prepared[0], decode_sample[0], dtype):
            continue
        if kernel.one_row:
            decode_calls[kernel.name] = [
                _call(kernel, w, torch.randn(1, q.shape[1], generator=generator).to(dtype))
                for w, (q, _) in zip(prepared, decode_sample)]
        if kernel.many_rows:
            prefill_calls[kernel.name] = [
                _call(kernel, w, torch.randn(PREFILL_ROWS, q.shape[1], generator=generator).to(dtype))
                for w, (q, _) in zip(prepared, prefill_sample)]
    with torch.inference_mode():
        decode_s = _time(decode_calls, rounds)
        prefill_s = _time(prefill_calls, rounds)
    decode_share = total / sum(q.numel() for q, _ in decode_sample)
    prefill_share = total / sum(q.numel() for q, _ in prefill_sample) / PREFILL_ROWS
    return ({name: s * 1e3 * decode_share for name, s in decode_s.items()},
            {name: s * 1e3 * prefill_share for name, s in prefill_s.items()})


def _call(kernel: Kernel, prepared: object, x: Tensor) -> Callable[[], object]:
    return lambda: kernel.run(x, prepared)


def time_and_choose(weights: Sequence[Weight], dtype: torch.dtype, names: Sequence[str]) -> Tuple[Choice, float]:
    """Time the kernels ``names`` (and the float matmul) on the model's weights and choose; returns the choice and
    the seconds it took."""
    start = time.perf_counter()
    decode_ms, prefill_ms = measure(weights, dtype, [*names, FALLBACK])
    copy_bytes = sum(q.numel() for q, _ in weights)
    return choose(decode_ms, prefill_ms, copy_bytes, available_memory()), time.perf_counter() - start
