"""The image side of an XTuner LLaVA model: CLIP tower (LoRA merged), projector, and the splice into the prompt.

What ``xtuner chat --llava`` computes (InternLM/xtuner v0.1.17 and v0.1.23 agree: tools/chat.py,
model/utils.py ``prepare_inputs_labels_for_multimodal``, dataset/utils.py ``expand2square``):
- the image, as RGB, is padded to a square filled with the processor's ``image_mean`` times 255, each channel
  truncated to int; the original sits centred, offset by (long side - short side) // 2;
- then ``CLIPImageProcessor`` (transformers 4.x: the PIL one) from the CLIP folder;
- the tower's ``hidden_states[-2]`` (``--visual-select-layer`` -2) without its first (CLS) token, then the projector,
  an ``nn.Sequential`` of Linear, then (act, Linear) per extra depth: weights ``model.0.*``, ``model.2.*``, ...;
- the question becomes ``'<image>\\n' + question`` inside the internlm2_chat template; the prompt text is split at
  ``<image>``, each chunk tokenised on its own (the first with BOS), and the image's embeddings go between the
  chunks' token embeddings.
- xtuner chat takes one image, in the first turn only, and re-encodes later turns without BOS (a quirk of its loop,
  not of training, which always starts with BOS): here every prompt starts with BOS, and an image sent in a later
  turn opens that turn's question the same way, ``'<image>\\n' + question``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional, Sequence

import torch
from torch import nn

from ..model.llava_layout import LlavaLayout
from .images import open_image

IMAGE_MARK = -200  # where an image's embeddings go in a list of token ids (XTuner's IMAGE_TOKEN_INDEX)
IMAGE_SLOT = "\ue000image\ue000"  # <image> in rendered prompt text; a private-use character users cannot send
SELECT_LAYER = -2


def square_padded(image: object, mean: Sequence[float]) -> object:
    """The image centred on a square of the processor's mean colour (what the model was trained on)."""
    from PIL import Image

    width, height = image.size
    if width == height:
        return image
    side = max(width, height)
    square = Image.new(image.mode, (side, side), tuple(int(channel * 255) for channel in mean))
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return square


def image_processor(folder: Path) -> object:
    """CLIP's image processor from its folder, the PIL implementation XTuner ran (transformers 5 names it
    CLIPImageProcessorPil; its default CLIPImageProcessor needs torchvision and resizes slightly differently)."""
    import transformers

    return (getattr(transformers, "CLIPImageProcessorPil", None) or transformers.CLIPImageProcessor).from_pretrained(
        str(folder))


def read_projector(folder: Path, dtype: torch.dtype) -> nn.Sequential:
    """XTuner's projector without its remote code: Linear, then (activation, Linear) for each extra depth."""
    from transformers.activations import ACT2FN

    from .safetensors_file import read_safetensors

    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    visual, hidden, depth = int(config["visual_hidden_size"]), int(config["llm_hidden_size"]), int(config["depth"])
    bias = bool(config.get("bias", True))
    layers: List[nn.Module] = [nn.Linear(visual, hidden, bias=bias)]
    for _ in range(1, depth):
        layers += [ACT2FN[config.get("hidden_act", "gelu")], nn.Linear(hidden, hidden, bias=bias)]
    projector = nn.Sequential(*layers)
    if (folder / "model.safetensors").is_file():
        tensors = read_safetensors(folder / "model.safetensors")
    elif (folder / "pytorch_model.bin").is_file():
        tensors = torch.load(str(folder / "pytorch_model.bin"), map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(f"{folder} has no model.safetensors or pytorch_model.bin: the projector's weights "
                                "are missing; upload the whole projector/ folder that pth_to_hf wrote.")
    state = {name[len("model."):]: tensor for name, tensor in tensors.items() if name.startswith("model.")}
    missing, unexpected = projector.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError(f"The projector in {folder} does not match its config.json (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]}); upload projector/ as pth_to_hf wrote it.")
    return projector.to(dtype).eval()


def _align_adapter_names(adapter: object, names: Sequence[str]) -> None:
    """transformers 4 kept CLIPVisionModel's layers under ``vision_model.``, 5 does not; adapters saved by
    XTuner (transformers 4.3x) say ``vision_model.encoder...``. Rename each update to the loaded model's name."""
    known = set(names)
    for name in list(adapter.updates):
        if name in known:
            continue
        for other in (name[len("vision_model."):] if name.startswith("vision_model.") else "",
                      "vision_model." + name):
            if other in known:
                adapter.updates[other] = adapter.updates.pop(name)
                break


def load_tower(folder: Path, dtype: torch.dtype, adapter_folder: Optional[Path]) -> nn.Module:
    """CLIPVisionModel from a CLIP folder (whole CLIPModel repos too), with the visual LoRA merged in memory."""
    from transformers import CLIPVisionModel

    from .hf_compat import dtype_keyword
    from .lora import load_adapter, merge_into_model

    tower = CLIPVisionModel.from_pretrained(str(folder), **{dtype_keyword(): torch.float32})
    if adapter_folder is not None:
        adapter = load_adapter(adapter_folder)
        _align_adapter_names(adapter, [name for name, _ in tower.named_parameters()])
        merge_into_model(tower, adapter)  # every update must find its weight: a mismatch fails here, loudly
    return tower.to(dtype).eval()


@dataclass
class Vision:
    """CLIP tower, its processor and the projector: image bytes in, embeddings for the LLM out."""

    tower: nn.Module
    processor: object
    projector: nn.Sequential
    dtype: torch.dtype

    @classmethod
    def load(cls, layout: LlavaLayout, clip_folder: Path, dtype: torch.dtype, device: str = "cpu") -> "Vision":
        tower_folder = layout.visual_encoder or clip_folder
        return cls(load_tower(tower_folder, dtype, layout.visual_adapter).to(device), image_processor(tower_folder),
                   read_projector(layout.projector, dtype).to(device), dtype)

    @property
    def tokens_per_image(self) -> int:
        """Patches per image: what one image costs in the LLM's context."""
        config = self.tower.config
        return (config.image_size // config.patch_size) ** 2

    def embed(self, data: bytes) -> torch.Tensor:
        """(tokens_per_image, llm hidden) embeddings of one uploaded image."""
        image = square_padded(open_image(data), self.processor.image_mean)
        pixels = self.processor(images=image, return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            pixels = pixels.to(device=self.tower.device, dtype=self.dtype)
            states = self.tower(pixels, output_hidden_states=True).hidden_states[SELECT_LAYER]
            return self.projector(states[0, 1:])


def tokenize_with_images(tokenizer: object, text: str) -> List[int]:
    """Token ids of prompt text holding IMAGE_SLOTs: each chunk between them tokenised on its own (as XTuner
    does, so no token spans an image), IMAGE_MARK where the image goes."""
    ids: List[int] = []
    for index, chunk in enumerate(text.split(IMAGE_SLOT)):
        if index:
            ids.append(IMAGE_MARK)
        ids.extend(tokenizer(chunk, add_special_tokens=False)["input_ids"])
    return ids


def splice(embedding: nn.Module, ids: Sequence[int], images: Sequence[torch.Tensor]) -> torch.Tensor:
    """(1, length, hidden) input embeddings: token embeddings with each image's embeddings at its IMAGE_MARK."""
    marks = [i for i, token in enumerate(ids) if token == IMAGE_MARK]
    if len(marks) != len(images):
        raise ValueError(f"{len(marks)} image places in the prompt but {len(images)} images")
    weight = embedding.weight
    parts: List[torch.Tensor] = []
    start = 0
    for mark, image in zip(marks + [len(ids)], list(images) + [None]):
        text = torch.tensor(list(ids[start:mark]), dtype=torch.long, device=weight.device)
        parts.append(embedding(text))
        if image is not None:
            parts.append(image.to(device=weight.device, dtype=weight.dtype))
        start = mark + 1
    return torch.cat(parts).unsqueeze(0)
