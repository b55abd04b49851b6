"""The repo check for an XTuner LLaVA folder (``xtuner convert pth_to_hf`` of a LLaVA config), standard library only.

Every part is there; the projector's sizes match the CLIP tower's and the LLM's hidden sizes; each adapter fits
its model; the fit counts the LLM, the tower and the projector. The LLM's own checks come from the usual check on
the base (``check_base``), the tower's config from ``visual_config`` (both supplied by check.py, which lists repos).
"""

from __future__ import annotations

from typing import Callable, Dict, List, Optional, Sequence, Tuple

from .adapter import OFFICIAL_BASES, AdapterError, check_adapter_shapes, parse_adapter_config, read_safetensors_shapes
from .adapter_check import HIDDEN_TO_BASE, adapter_file_on_disk
from .llava_layout import LLM_ADAPTER, OFFICIAL_CLIP, PROJECTOR, VISUAL_ADAPTER, VISUAL_ENCODER

PROJECTOR_KEYS = ("visual_hidden_size", "llm_hidden_size", "depth")
# CLIP-ViT-L/14-336's vision tower (its config.json): what XTuner's LLaVA recipes train with.
CLIP_L_336 = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 24, "image_size": 336,
              "patch_size": 14}


def is_llava_listing(names: Sequence[str]) -> bool:
    return f"{PROJECTOR}/config.json" in names


def vision_part(config: Optional[dict]) -> Optional[dict]:
    """The vision settings of a CLIP repo's config.json (a whole CLIPModel's ``vision_config``, or a tower's own)."""
    if not isinstance(config, dict):
        return None
    vision = config.get("vision_config") if config.get("model_type") == "clip" else config
    return vision if isinstance(vision, dict) and "hidden_size" in vision else None


def tower_bytes(vision: dict, bytes_per_weight: int = 4) -> int:
    """The vision tower's weights: per layer 4 attention and 2 MLP matrices, plus the patch and position tables."""
    hidden, inter = int(vision["hidden_size"]), int(vision.get("intermediate_size", 4 * vision["hidden_size"]))
    layers, patch = int(vision.get("num_hidden_layers", 24)), int(vision.get("patch_size", 14))
    positions = (int(vision.get("image_size", 336)) // patch) ** 2 + 1
    params = layers * (4 * hidden * hidden + 2 * hidden * inter) + 3 * patch * patch * hidden + positions * hidden
    return params * bytes_per_weight


def extra_bytes(projector: dict, vision: dict) -> int:
    """What a LLaVA model holds beside its LLM, in float32: the tower and the projector (what the fit adds)."""
    visual, hidden = int(projector["visual_hidden_size"]), int(projector["llm_hidden_size"])
    return tower_bytes(vision) + 4 * hidden * (visual + hidden)


def _adapter_shapes(listing: object, folder: str, remote_url: str) -> Tuple[Optional[dict], Optional[dict], str]:
    """(adapter config, tensor shapes or None when not on this machine, problem)."""
    data, problem = listing.read_json(f"{folder}/adapter_config.json")
    if data is None:
        return None, None, problem
    try:
        config = parse_adapter_config(data, f"{folder}/adapter_config.json")
    except AdapterError as error:
        return None, None, str(error)
    weights = next((f"{folder}/{n}" for n in ("adapter_model.safetensors", "adapter_model.bin") if
                    listing.has(f"{folder}/{n}")), "")
    if not weights:
        return None, None, f"{folder}/ has no adapter_model.safetensors or adapter_model.bin"
    on_disk = adapter_file_on_disk(listing.root, weights, weights in listing.lfs, remote_url)
    if on_disk is None or not weights.endswith(".safetensors"):
        return config, None, ""
    try:
        return config, read_safetensors_shapes(on_disk), ""
    except (AdapterError, OSError, ValueError, KeyError) as error:
        return None, None, str(error)


def _visual_adapter_problems(shapes: Dict[str, Sequence[int]], vision: dict) -> List[str]:
    """Each LoRA A's input width against the tower: the intermediate size for fc2, the hidden size elsewhere."""
    problems = []
    for name, shape in shapes.items():
        if ".lora_A." not in name:
            continue
        want = vision.get("intermediate_size") if ".fc2." in name else vision["hidden_size"]
        if want is not None and shape[-1] != want:
            problems.append(f"{name} reads width {shape[-1]}, the tower has {want}")
    return problems


def check_llava_repo(listing: object, remote_url: str, base_repo: str, base_revision: str, visual_repo: str,
                     visual_revision: str, check_base: Callable[[str, str], object],
                     visual_config: Callable[[str, str], Optional[dict]], make_check: Callable[..., object],
                     statuses: dict) -> List[object]:
    """Check lines for a LLaVA folder; ``visual_repo`` is the CLIP repo the app will pull (its default filled in)."""
    ok, warn, fail, info = statuses["ok"], statuses["warn"], statuses["fail"], statuses["info"]
    lines: List[object] = []
    projector, problem = listing.read_json(f"{PROJECTOR}/config.json")
    missing = [key for key in PROJECTOR_KEYS if projector is not None and not isinstance(projector.get(key), int)]
    weights = [n for n in ("model.safetensors", "pytorch_model.bin") if listing.has(f"{PROJECTOR}/{n}")]
    if projector is None or missing or not weights:
        what = problem or (f"projector/config.json lacks {', '.join(missing)}" if missing else
                           "projector/ has no model.safetensors or pytorch_model.bin")
        return [make_check("2 LLaVA parts", fail, what, "upload the whole folder `xtuner convert pth_to_hf` wrote"
                           " (projector/ with its config.json and weights)")]
    parts = [name for name in (LLM_ADAPTER, VISUAL_ADAPTER, VISUAL_ENCODER) if
             any(path.startswith(name + "/") for path in listing.sizes)]
    lines.append(make_check("2 LLaVA parts", ok, f"projector ({projector['visual_hidden_size']} -> "
                            f"{projector['llm_hidden_size']}, depth {projector['depth']})"
                            + (f", {', '.join(parts)}" if parts else "; no adapters: a pretrain (projector only)")))
    llm_whole = listing.has("config.json")
    base_config = None
    if llm_whole:
        lines.append(make_check("3 base model", info, "the LLM is saved whole in this repo (trained unfrozen)"))
    elif not base_repo:
        guess = HIDDEN_TO_BASE.get(projector["llm_hidden_size"])
        lines.append(make_check("3 base model", fail, "this repo holds an XTuner LLaVA model (projector and adapters)"
                                f" and no base LLM was given{f' (its projector says {guess})' if guess else ''}",
                                f"answer base_model_repo (or set BASE_MODEL_REPO) with the LLM it was trained on, "
                                f"e.g. {OFFICIAL_BASES}"))
        return lines
    else:
        base_report = check_base(base_repo, base_revision)
        for check in base_report.checks:
            check.title = "base " + check.title
        lines.extend(base_report.checks)
        base_config = getattr(base_report, "config", None)
    if base_config is not None:
        hidden = base_config.get("hidden_size")
        lines.append(make_check("4 projector fits the LLM", ok if hidden == projector["llm_hidden_size"] else fail,
                                f"projector writes {projector['llm_hidden_size']}, the LLM's hidden size is {hidden}",
                                "answer the base_model_repo the LLaVA model was trained on"))
        config, shapes, problem = _adapter_shapes(listing, LLM_ADAPTER, remote_url)
        if problem:
            lines.append(make_check("4 LLM adapter", fail, problem, "export the LLaVA folder again"))
        elif shapes is not None:
            found = check_adapter_shapes(shapes, base_config, config)
            lines.append(make_check("4 LLM adapter fits the base", fail if found else ok,
                                    found[0] if found else f"{len(shapes)} tensors fit",
                                    "answer the base_model_repo the LLaVA model was trained on"))
    if listing.has(f"{VISUAL_ENCODER}/config.json"):  # the tower trained unfrozen, saved whole in this repo
        vision = vision_part(listing.read_json(f"{VISUAL_ENCODER}/config.json")[0])
    else:
        vision = vision_part(visual_config(visual_repo, visual_revision))
    if vision is None:
        lines.append(make_check("4 visual encoder", warn, f"the CLIP config of {visual_repo} could not be read",
                                f"answer visual_encoder_repo with the CLIP tower it was trained with, e.g. "
                                f"{OFFICIAL_CLIP}"))
        vision = CLIP_L_336
    else:
        fits = vision["hidden_size"] == projector["visual_hidden_size"]
        lines.append(make_check("4 projector fits CLIP", ok if fits else fail,
                                f"projector reads {projector['visual_hidden_size']}, the tower's hidden size is "
                                f"{vision['hidden_size']}",
                                f"answer visual_encoder_repo with the CLIP it was trained with, e.g. {OFFICIAL_CLIP}"))
        config, shapes, problem = _adapter_shapes(listing, VISUAL_ADAPTER, remote_url)
        if problem and any(path.startswith(VISUAL_ADAPTER + "/") for path in listing.sizes):
            lines.append(make_check("4 visual adapter", fail, problem, "export the LLaVA folder again"))
        elif shapes is not None:
            found = _visual_adapter_problems(shapes, vision)
            lines.append(make_check("4 visual adapter fits CLIP", fail if found else ok,
                                    found[0] if found else f"{len(shapes)} tensors fit",
                                    f"answer visual_encoder_repo with the CLIP it was trained with, e.g. "
                                    f"{OFFICIAL_CLIP}"))
    extra = extra_bytes(projector, vision)
    lines.append(make_check("7 fits, with images", info, f"the CLIP tower and projector add about "
                            f"{extra / 1e9:.2f} GB (float32) to the LLM's figure above"))
    return lines
