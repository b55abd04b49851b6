"""Recognise the folder ``xtuner convert pth_to_hf`` writes for a LLaVA config, standard library only.

What XTuner (v0.1.17 to v0.1.23, ``LLaVAModel.to_hf``/``pth_to_hf``) writes there:
- ``projector/`` always: ``config.json`` (model_type "projector"; visual_hidden_size, llm_hidden_size, depth,
  hidden_act, bias) and its weights;
- ``llm_adapter/`` and ``visual_encoder_adapter/`` for parts trained with LoRA (peft folders);
- ``visual_encoder/`` when the tower itself was unfrozen, and the whole LLM at the top level when it was;
- ``xtuner_config.py``.
A pretrain run writes ``projector/`` alone: it is then chatted with the plain base LLM and CLIP.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

PROJECTOR, LLM_ADAPTER, VISUAL_ADAPTER, VISUAL_ENCODER = ("projector", "llm_adapter", "visual_encoder_adapter",
                                                          "visual_encoder")
# The CLIP tower of XTuner's LLaVA recipes (``visual_encoder_name_or_path``), per hub. Checked: Hugging Face's
# openai repo, and ModelScope's AI-ModelScope mirror (ms-swift pulls it by that name). No OpenXLab mirror was
# found, so apps there use ModelScope's, which is reachable from the same networks.
CLIP_336 = {"huggingface": "https://huggingface.co/openai/clip-vit-large-patch14-336",
            "modelscope": "https://www.modelscope.cn/AI-ModelScope/clip-vit-large-patch14-336.git"}
OFFICIAL_CLIP = f"{CLIP_336['huggingface']} (or {CLIP_336['modelscope']})"


@dataclass(frozen=True)
class LlavaLayout:
    """The parts of one LLaVA folder; None where the folder lacks that part."""

    folder: Path
    projector: Path
    llm_adapter: Optional[Path]
    visual_adapter: Optional[Path]
    visual_encoder: Optional[Path]  # the tower saved whole (trained unfrozen): no separate CLIP repo needed
    llm: Optional[Path]  # the LLM saved whole at the top level: no base repo needed


def default_visual_encoder(hub: str) -> str:
    """CLIP-ViT-L/14-336 on the model's own hub, ModelScope's copy for OpenXLab, Hugging Face's elsewhere."""
    return CLIP_336["modelscope" if hub in ("modelscope", "openxlab") else "huggingface"]


def is_llava_folder(folder: Path) -> bool:
    config = Path(folder) / PROJECTOR / "config.json"
    if not config.is_file():
        return False
    try:
        return json.loads(config.read_text(encoding="utf-8")).get("model_type") == "projector"
    except (ValueError, OSError, AttributeError):
        return False


def find_llava(folder: Path) -> Optional[LlavaLayout]:
    """The LLaVA parts in folder, or None when it is not an XTuner LLaVA folder."""
    folder = Path(folder)
    if not is_llava_folder(folder):
        return None

    def part(name: str, marker: str) -> Optional[Path]:
        return folder / name if (folder / name / marker).is_file() else None

    return LlavaLayout(folder=folder, projector=folder / PROJECTOR,
                       llm_adapter=part(LLM_ADAPTER, "adapter_config.json"),
                       visual_adapter=part(VISUAL_ADAPTER, "adapter_config.json"),
                       visual_encoder=part(VISUAL_ENCODER, "config.json"),
                       llm=folder if (folder / "config.json").is_file() else None)
