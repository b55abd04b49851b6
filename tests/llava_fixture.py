"""A tiny XTuner LLaVA world: CLIP tower, InternLM2 base and the folder ``xtuner convert pth_to_hf`` writes.

Facts it imitates (InternLM/xtuner v0.1.17 and v0.1.23, xtuner/model/llava.py, modules/projector/, and the
tutorial's config llava_internlm2_chat_1_8b_qlora_clip_vit_large_p14_336_lora_e1_gpu8_finetune):
- ``projector/``: ``config.json`` (model_type "projector", keys visual_hidden_size, llm_hidden_size, depth,
  hidden_act, bias, an auto_map to remote code) and the weights of ``nn.Sequential(Linear, GELU, Linear)``, i.e.
  ``model.0.*`` and ``model.2.*``, in fp32, as ``model.safetensors`` or ``pytorch_model.bin``;
- ``llm_adapter/``: a peft LoRA whose targets XTuner fills in with every Linear but ``lm_head``/``output_layer``,
  so InternLM2's head ``output`` is one (wqkv, wo, w1, w2, w3, output); r 512, alpha 256 in the tutorial; saved
  after ``llm.half()``, so fp16;
- ``visual_encoder_adapter/``: a peft LoRA on every Linear of CLIPVisionModel (q/k/v/out_proj, fc1, fc2);
  r 64, alpha 16; fp32;
- ``xtuner_config.py``. A pretrain run writes ``projector/`` (and the config) alone.
The CLIP repo (openai/clip-vit-large-patch14-336) is a whole CLIPModel: config.json of model_type "clip",
preprocessor_config.json (CLIPImageProcessor, 336 px, OpenAI's mean and std) and weights; here 56 px, patch 14.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Dict

import internlm2_fixture as fx
import tinymodel

CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]  # OpenAI CLIP's, as its preprocessor_config.json has them
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
IMAGE_SIZE, PATCH = 56, 14  # 16 patches + CLS; the real tower is 336 px / 14 = 576 patches
LLM_LORA = dict(r=8, lora_alpha=4)  # the tutorial's alpha/r = 256/512
VISUAL_LORA = dict(r=8, lora_alpha=2)  # the tutorial's alpha/r = 16/64
LFS_PATTERNS = (*tinymodel.LFS_PATTERNS, "*.h5", "*.msgpack")
XTUNER_CONFIG = """# The tutorial's model section, shortened (xtuner_config.py is written beside the converted parts)
llm_name_or_path = '/root/share/new_models/Shanghai_AI_Laboratory/internlm2-chat-1_8b'
visual_encoder_name_or_path = '/root/share/new_models/openai/clip-vit-large-patch14-336'
prompt_template = 'internlm2_chat'
model = dict(
    type='LLaVAModel', freeze_llm=True, freeze_visual_encoder=True,
    llm_lora=dict(type='LoraConfig', r=512, lora_alpha=256, lora_dropout=0.05, bias='none', task_type='CAUSAL_LM'),
    visual_encoder_lora=dict(type='LoraConfig', r=64, lora_alpha=16, lora_dropout=0.05, bias='none'))
"""
PROJECTOR_CODE_NOTE = "# XTuner's remote code for the projector; the app never runs it.\n"


def build_clip(folder: Path, hidden: int = 32, layers: int = 3, seed: int = 0) -> Path:
    """A whole tiny CLIPModel saved as the openai repo is laid out, plus copies for other frameworks' names."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=99, max_position_embeddings=16),
        vision_config=dict(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                           num_attention_heads=4, image_size=IMAGE_SIZE, patch_size=PATCH, hidden_act="quick_gelu"),
        projection_dim=16)
    model = CLIPModel(config).eval()
    with torch.no_grad():  # far from zero: each layer must matter, so hidden_states[-2] differs from [-1]
        for param in model.vision_model.parameters():
            param.add_(torch.randn_like(param) * 0.05)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(folder), safe_serialization=True)
    state = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    torch.save(state, str(folder / "pytorch_model.bin"))
    (folder / "tf_model.h5").write_bytes(b"tensorflow copy: the app must not download this\n" * 64)
    (folder / "flax_model.msgpack").write_bytes(b"flax copy: the app must not download this\n" * 64)
    processor = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE,
                                   "width": IMAGE_SIZE}, image_mean=CLIP_MEAN, image_std=CLIP_STD,
                                   do_center_crop=True, do_resize=True, resample=3, do_convert_rgb=True)
    processor.save_pretrained(str(folder))
    return folder


def _randomize_lora(peft_model: object, seed: int) -> None:
    """Trained-looking LoRA tensors: each scale * B @ A about half as wide as the weight it changes."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in peft_model.modules():
            if hasattr(module, "lora_A") and "default" in module.lora_A:
                s, r = module.scaling["default"], module.r["default"]
                a, b = module.lora_A["default"].weight, module.lora_B["default"].weight
                a.copy_(torch.randn(a.shape, generator=gen) / a.shape[1] ** 0.5)
                b.copy_(torch.randn(b.shape, generator=gen) * 0.5 / (s * r ** 0.5))


def _linear_names(model: object) -> list:
    """XTuner's find_all_linear_names rule: the last name part of every nn.Linear, less lm_head/output_layer."""
    from torch import nn

    names = {name.split(".")[-1] for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    return sorted(names - {"lm_head", "output_layer"})


def write_llm_adapter(base: Path, out: Path, safe: bool, seed: int = 1) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(base), trust_remote_code=True, dtype=torch.float32)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.05, bias="none",
                                                  target_modules=_linear_names(model), **LLM_LORA))
    _randomize_lora(peft_model, seed)
    peft_model.half()  # pth_to_hf halves the LLM before saving (unless --fp32)
    peft_model.save_pretrained(str(out), safe_serialization=safe)
    return out


def write_visual_adapter(clip: Path, out: Path, safe: bool, seed: int = 2) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import CLIPVisionModel

    tower = CLIPVisionModel.from_pretrained(str(clip))
    peft_model = get_peft_model(tower, LoraConfig(lora_dropout=0.05, bias="none", target_modules=_linear_names(tower),
                                                  **VISUAL_LORA))
    _randomize_lora(peft_model, seed)
    peft_model.save_pretrained(str(out), safe_serialization=safe)
    as_transformers4_names(out)
    return out


def as_transformers4_names(adapter: Path) -> None:
    """XTuner ran transformers 4.3x-4.4x, whose CLIPVisionModel holds its layers under ``vision_model.``;
    transformers 5 dropped that level. Published visual adapters therefore carry ``vision_model.`` in every key."""
    import torch
    from safetensors.torch import load_file, save_file

    path = next(adapter.glob("adapter_model.*"))
    tensors = load_file(str(path)) if path.suffix == ".safetensors" else torch.load(str(path), weights_only=True)
    if any(".vision_model." in key for key in tensors):
        return  # saved under transformers 4 already
    renamed = {key.replace("base_model.model.", "base_model.model.vision_model.", 1): t for key, t in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(renamed, str(path), metadata={"format": "pt"})
    else:
        torch.save(renamed, str(path))


def projector_weights(visual_hidden: int, llm_hidden: int, seed: int = 3) -> Dict[str, object]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    return {"model.0.weight": torch.randn(llm_hidden, visual_hidden, generator=gen) / visual_hidden ** 0.5,
            "model.0.bias": torch.randn(llm_hidden, generator=gen) * 0.1,
            "model.2.weight": torch.randn(llm_hidden, llm_hidden, generator=gen) * 2.0 / llm_hidden ** 0.5,
            "model.2.bias": torch.randn(llm_hidden, generator=gen) * 0.1}


def write_projector(out: Path, visual_hidden: int, llm_hidden: int, safe: bool, seed: int = 3) -> Path:
    import torch
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["ProjectorModel"],
              "auto_map": {"AutoConfig": "configuration_projector.ProjectorConfig",
                           "AutoModel": "modeling_projector.ProjectorModel"},
              "bias": True, "depth": 2, "hidden_act": "gelu", "llm_hidden_size": llm_hidden,
              "model_type": "projector", "torch_dtype": "float32", "transformers_version": "4.39.3",
              "visual_hidden_size": visual_hidden}
    (out / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    for name in ("configuration_projector.py", "modeling_projector.py"):
        (out / name).write_text(PROJECTOR_CODE_NOTE, encoding="utf-8")
    weights = projector_weights(visual_hidden, llm_hidden, seed)
    if safe:
        save_file(weights, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        torch.save(weights, str(out / "pytorch_model.bin"))
    return out


def build_llava_folder(out: Path, base: Path, clip: Path, safe: bool, pretrain_only: bool = False) -> Path:
    """The pth_to_hf output: projector/ and, for the finetune, llm_adapter/ and visual_encoder_adapter/."""
    out.mkdir(parents=True, exist_ok=True)
    llm_hidden = json.loads((base / "config.json").read_text())["hidden_size"]
    visual_hidden = json.loads((clip / "config.json").read_text())["vision_config"]["hidden_size"]
    write_projector(out / "projector", visual_hidden, llm_hidden, safe)
    if not pretrain_only:
        write_llm_adapter(base, out / "llm_adapter", safe)
        write_visual_adapter(clip, out / "visual_encoder_adapter", safe)
    (out / "xtuner_config.py").write_text(XTUNER_CONFIG, encoding="utf-8")
    return out


def build_world(root: Path) -> Dict[str, Path]:
    """Base, CLIP, and the three LLaVA folders (safetensors, .bin, pretrain-only) under root."""
    base = fx.build_internlm2(root / "base", hidden=64, layers=2, max_position_embeddings=256)
    clip = build_clip(root / "clip")
    return {"base": base, "clip": clip,
            "safetensors": build_llava_folder(root / "llava-safetensors", base, clip, safe=True),
            "bin": build_llava_folder(root / "llava-bin", base, clip, safe=False),
            "pretrain": build_llava_folder(root / "llava-pretrain", base, clip, safe=True, pretrain_only=True)}


def publish_tree(folder: Path, bare: Path) -> str:
    """Push a folder with subfolders into a new bare git-lfs repo; returns its file:// URL."""
    work = bare.with_name(bare.name + ".work")
    tinymodel.git("init", "-q", "--bare", "-b", "main", str(bare))
    tinymodel.git("init", "-q", "-b", "main", str(work))
    tinymodel.git("lfs", "install", "--local", cwd=work)
    for pattern in LFS_PATTERNS:
        tinymodel.git("lfs", "track", pattern, cwd=work)
    for path in folder.rglob("*"):
        if path.is_file():
            target = work / path.relative_to(folder)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(path.read_bytes())
    tinymodel.git("add", "-A", cwd=work)
    tinymodel.git("commit", "-q", "-m", f"{folder.name}", cwd=work)
    url = bare.resolve().as_uri()
    tinymodel.git("push", "-q", url, "main", cwd=work)
    return url
