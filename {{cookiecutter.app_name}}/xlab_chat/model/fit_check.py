"""Check 7: the model fits the hardware: a GPU card, the platforms' CPU tiers, or this computer's memory.

Estimated from the stored weight bytes, the dtype and the KV cache of a long chat; nothing is downloaded.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from .listing import Listing
from .platform_tiers import GB, NAMES, chosen_platforms, cpu_tiers
from .report import FAIL, INFO, OK, SKIP, WARN, Check, human_params

DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2, "float64": 8, "int8": 1}
GIB = 1024 ** 3
DEFAULT_CONTEXT = 4096  # tokens of KV cache reserved: a long chat at the app's defaults
ACTIVATIONS = 0.5 * GIB
# Memory a model may use on each card: nominal size less the CUDA context and the allocator's slack.
CARDS = {"a10-24gb": ("an NVIDIA A10 (24 GB)", 22.0 * GIB), "a100-40gb": ("an NVIDIA A100 (40 GB)", 39.0 * GIB)}
TIGHT = 0.9


def machine_memory() -> Optional[int]:
    """This machine's RAM in bytes, where the OS tells the standard library."""
    try:
        return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_PHYS_PAGES"))
    except (AttributeError, ValueError, OSError):
        return None


def estimate_memory(weight_bytes: int, config: dict, runtime_bytes: float,
                    kv_bytes: Optional[int] = None) -> Tuple[float, float, str]:
    """(params, bytes needed at runtime, note) from stored weight bytes and the config.

    runtime_bytes per weight (1 for int8), kv_bytes per cached key/value element (default: the same)."""
    dtype = str(config.get("torch_dtype") or config.get("dtype") or "").replace("torch.", "")
    quantized = bool(config.get("quantization_config"))
    stored = DTYPE_BYTES.get(dtype)
    note = ""
    if quantized:
        params, weights = 0.0, float(weight_bytes)
        note = "quantized: counted as stored"
    elif stored:
        params = weight_bytes / stored
        weights = params * runtime_bytes
    else:
        params, weights = weight_bytes / 2, float(weight_bytes)
        note = "config.json names no dtype: counted as stored"
    layers = int(config.get("num_hidden_layers") or 0)
    heads = int(config.get("num_attention_heads") or 0)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    hidden = int(config.get("hidden_size") or 0)
    head_dim = int(config.get("head_dim") or (hidden // heads if heads else 0))
    context = min(int(config.get("max_position_embeddings") or DEFAULT_CONTEXT), DEFAULT_CONTEXT)
    kv = 2 * layers * kv_heads * head_dim * context * (kv_bytes or runtime_bytes)
    if not kv:
        kv = 0.05 * weights
    return params, weights + kv + ACTIVATIONS, note


def _cpu_fit(need32: float, need16: float, memory: int) -> str:
    """fits (float32 too), bf16 (only where the CPU runs bfloat16) or small."""
    if need16 > memory:
        return "small"
    return "bf16" if need32 > memory else "fits"


def _check_cpu_fit(title: str, need32: float, need16: float, weight_bytes: int, config: dict, head: str,
                   platforms: str, need8: Optional[float] = None) -> List[Check]:
    """Judged on the CPU tiers of the platforms answered; this computer's RAM is a second, informative line."""
    if need8 is not None:  # int8 weights: the app needs need8 whatever the CPU's bf16 support
        need32 = need16 = need8
    _, need_gpu, _ = estimate_memory(weight_bytes, config, 2)
    card = next((name for name, (_, usable) in CARDS.items() if need_gpu <= usable), "")
    smaller = "use a smaller model (about 1.8B parameters suits a CPU)" + (f" or a GPU (hardware {card})" if card
                                                                             else "")
    ram = machine_memory()
    here = "" if ram is None else f"this computer has {ram / GIB:.1f} GiB"
    hosted = chosen_platforms(platforms)
    if not hosted:  # local only: this machine is where it runs
        if ram is None:
            return [Check(title, OK, head + "; this machine's memory is unknown")]
        verdict = _cpu_fit(need32, need16, ram)
        if verdict == "small":
            return [Check(title, WARN, f"{head}; {here}", smaller)]
        if verdict == "bf16":
            return [Check(title, WARN, f"{head}; {here} (enough only where the CPU runs bfloat16)",
                          "use a smaller model or a machine with more memory")]
        return [Check(title, OK, f"{head}; {here}")]
    parts, worst, unknown = [], "fits", []
    for platform in hosted:
        tiers = [tier for tier in cpu_tiers(platform) if tier.memory]
        if not tiers:
            unknown.append(NAMES[platform])
            continue
        fitting = [tier for tier in tiers if _cpu_fit(need32, need16, tier.memory or 0) == "fits"]
        squeezed = [tier for tier in tiers if _cpu_fit(need32, need16, tier.memory or 0) == "bf16"]
        best = (fitting or squeezed or [None])[0]
        if best is None:
            parts.append(f"{NAMES[platform]}: no CPU tier is large enough (the largest has"
                         f" {max(t.memory or 0 for t in tiers) / GB:.0f} GB)")
            worst = "small"
            continue
        cost = "free" if best.free else "paid"
        note = "" if best in fitting else ", only if its CPU runs bfloat16"
        parts.append(f"{NAMES[platform]} {best.name} ({best.memory / GB:.0f} GB, {cost}){note}")
        if worst != "small" and (best not in fitting or not best.free):
            worst = "tight"
    detail = f"{head}; fits " + "; ".join(parts) if parts else head
    if unknown:
        verb = "documents" if len(unknown) == 1 else "document"
        detail += f"; {' and '.join(unknown)} {verb} no CPU tier memory, so not judged there"
    checks = []
    if worst == "small":
        checks.append(Check(title, WARN, detail, smaller))
    elif worst == "tight":
        checks.append(Check(title, WARN, detail, "choose that tier when deploying, or use a smaller model"))
    else:
        checks.append(Check(title, OK, detail))
    if ram is not None:
        verdict = {"fits": "fits", "bf16": "fits only where the CPU runs bfloat16", "small": "too small"}[
            _cpu_fit(need32, need16, ram)]
        checks.append(Check(f"{title} on this computer", INFO, f"{here}: {verdict} for `python app.py`"))
    return checks


def check_fit(listing: Listing, weights: List[str], config: Optional[dict], hardware: str, dtype: str,
               platforms: str = "local", quantize: str = "auto") -> List[Check]:
    title = f"7 fits {hardware}"
    if not weights or config is None:
        return [Check(title, SKIP, "not checked (no weights or no config.json)")]
    weight_bytes = sum(listing.sizes[w] for w in weights)
    gpu_bytes = 4 if dtype == "float32" else 2
    params, need, note = estimate_memory(weight_bytes, config, gpu_bytes)
    size = f"{human_params(params)} parameters, " if params else ""
    unsure = " (" + note + ")" if note else ""
    if hardware == "cpu":
        _, need32, _ = estimate_memory(weight_bytes, config, 4)
        _, need16, _ = estimate_memory(weight_bytes, config, 2)
        head = f"{size}needs about {need32 / GIB:.1f} GiB in float32 or {need16 / GIB:.1f} GiB in bfloat16{unsure}"
        need8 = None
        if not note and (quantize == "int8" or (quantize == "auto" and dtype == "auto")):
            _, need8, _ = estimate_memory(weight_bytes, config, 1, kv_bytes=2)
            head = (f"{size}needs about {need8 / GIB:.1f} GiB with int8 weights (QUANTIZE={quantize}; "
                    f"{need16 / GIB:.1f} GiB in bfloat16, {need32 / GIB:.1f} GiB in float32){unsure}")
        return _check_cpu_fit(title, need32, need16, weight_bytes, config, head, platforms, need8)
    fits = [name for name, (_, usable) in CARDS.items() if need <= usable]
    detail = f"{size}needs about {need / GIB:.1f} GiB on the GPU{unsure}"
    if hardware not in CARDS:  # auto: the card is chosen when deploying
        if fits:
            return [Check(title, OK, f"{detail}: fits {' and '.join(fits)}")]
        return [Check(title, WARN, f"{detail}: too large for an A10 (24 GB) or an A100 (40 GB)",
                      "use a smaller or quantized model")]
    label, usable = CARDS[hardware]
    detail += f", {label} has about {usable / GIB:.0f} GiB usable"
    if need > usable:
        bigger = [name for name in fits if CARDS[name][1] > usable]
        fix = (f"answer hardware {bigger[0]}, or use a smaller model" if bigger
               else "use a smaller or quantized model (a 7B model fits an A10, a 20B one an A100 40 GB)")
        return [Check(title, WARN if note else FAIL, detail, fix)]
    if need > TIGHT * usable:
        return [Check(title, WARN, detail + ": tight, long chats may run out of memory",
                      "lower MAX_NEW_TOKENS, or use a larger card or a smaller model")]
    return [Check(title, OK, detail)]
