"""The CPU tiers of the platforms an app is deployed to, so "fits the hardware" is judged where it will run.

Standard library only (the hooks use it). Figures are the platforms' own
documentation as of 2026-11; ``None`` memory means the platform documents none.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

GB = 1000 ** 3  # the platforms quote decimal gigabytes


@dataclass(frozen=True)
class CPUTier:
    platform: str
    name: str
    vcpus: int
    memory: Optional[int]  # bytes; None where the platform documents no figure
    free: bool


CPU_TIERS: Tuple[CPUTier, ...] = (
    CPUTier("huggingface", "cpu-basic", 2, 16 * GB, True),
    CPUTier("huggingface", "cpu-upgrade", 8, 32 * GB, False),
    CPUTier("modelscope", "platform/2v-cpu-16g-mem", 2, 16 * GB, True),
    CPUTier("openxlab", "CPU", 0, None, True),
)
NAMES = {"openxlab": "OpenXLab", "huggingface": "Hugging Face Spaces", "modelscope": "ModelScope"}
HOSTED = tuple(NAMES)


def chosen_platforms(answer: str) -> Tuple[str, ...]:
    """The hosted platforms a ``platforms`` answer names: "all", "local", or names joined by "+"."""
    answer = (answer or "all").strip().lower()
    if answer == "all":
        return HOSTED
    return tuple(name for name in answer.split("+") if name in HOSTED)


def cpu_tiers(platform: str) -> List[CPUTier]:
    """That platform's CPU tiers, smallest first."""
    return [tier for tier in CPU_TIERS if tier.platform == platform]
