"""The repo check for a LoRA adapter repo (what ``xtuner convert pth_to_hf`` writes): the adapter is readable and
LoRA, a base model is given and passes the usual checks, and the adapter's shapes fit that base.

Standard library only. The base's own checks (including "fits the hardware", sized by the base) come from
``check.check_repo`` run on it; the adapter's tensor shapes are read from its safetensors header where that is
on this machine (a local folder, a plain blob, a ``file://`` remote's LFS store), else checked when the app loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, List, Optional

from .adapter import (
    CONFIG_NAME,
    OFFICIAL_BASES,
    WEIGHT_NAMES,
    AdapterError,
    check_adapter_shapes,
    parse_adapter_config,
    read_safetensors_shapes,
)
from .lfs_objects import local_store, read_pointers

HIDDEN_TO_BASE = {2048: "InternLM2-chat-1.8B", 4096: "InternLM2-chat-7B", 6144: "InternLM2-chat-20B"}


def is_adapter(names: List[str]) -> bool:
    return CONFIG_NAME in names and not any(name.endswith((".safetensors", ".bin")) and not name.startswith(
        "adapter_model") for name in names)


def adapter_file_on_disk(root: Path, name: str, lfs: bool, git_url: str) -> Optional[Path]:
    """The adapter weights' bytes on this machine, without downloading: the file itself, or a file:// LFS object."""
    if not lfs:
        return root / name
    store = local_store(git_url) if git_url else None
    pointers = read_pointers(root, [name])
    if store is None or not pointers:
        return None
    path = store / pointers[0].oid[:2] / pointers[0].oid[2:4] / pointers[0].oid
    return path if path.is_file() else None


def check_adapter_repo(listing: object, remote_url: str, base_repo: str, base_revision: str,
                       check_base: Callable[[str, str], object], make_check: Callable[..., object],
                       statuses: dict) -> List[object]:
    """Check lines for an adapter repo; ``check_base(repo, revision)`` runs the usual check on the base."""
    ok, warn, fail, info = statuses["ok"], statuses["warn"], statuses["fail"], statuses["info"]
    lines = []
    data, problem = listing.read_json(CONFIG_NAME)
    try:
        if data is None:
            raise AdapterError(problem)
        adapter = parse_adapter_config(data)
    except AdapterError as error:
        return [make_check("2 LoRA adapter", fail, str(error), "upload the adapter_config.json that"
                           " `xtuner convert pth_to_hf` wrote next to the adapter weights")]
    weights = next((name for name in WEIGHT_NAMES if listing.has(name)), "")
    if not weights:
        return [make_check("2 LoRA adapter", fail, "adapter_config.json but no adapter_model.safetensors or"
                           " adapter_model.bin", "upload the adapter weights with git lfs")]
    targets = ", ".join(sorted(adapter.target_modules)) if adapter.target_modules else "all linear layers"
    lines.append(make_check("2 LoRA adapter", ok, f"r={adapter.r}, lora_alpha={adapter.lora_alpha}, targets"
                            f" {targets}; {weights}"))
    if adapter.base_model_name_or_path:
        lines.append(make_check("2 LoRA adapter trained on", info, f"{adapter.base_model_name_or_path!r} (a path on"
                                " the training machine: never downloaded; the base comes from base_model_repo)"))
    shapes = None
    on_disk = adapter_file_on_disk(listing.root, weights, weights in listing.lfs, remote_url)
    if on_disk is not None and weights.endswith(".safetensors"):
        try:
            shapes = read_safetensors_shapes(on_disk)
        except (AdapterError, OSError, TypeError, ValueError, KeyError) as error:
            lines.append(make_check("4 adapter fits the base", fail, str(error), "export the adapter again"))
            return lines
    if not base_repo:
        guess = ""
        wqkv = next((shape for name, shape in (shapes or {}).items() if "wqkv.lora_A" in name), None)
        if wqkv and wqkv[-1] in HIDDEN_TO_BASE:
            guess = f" (its shapes say {HIDDEN_TO_BASE[wqkv[-1]]})"
        lines.append(make_check("3 base model", fail, f"this repo holds a LoRA adapter{guess} and no base model was"
                                " given", f"answer base_model_repo (or set BASE_MODEL_REPO) with the model it was"
                                f" trained on, e.g. {OFFICIAL_BASES}"))
        return lines
    base_report = check_base(base_repo, base_revision)
    for check in base_report.checks:
        check.title = "base " + check.title
    lines.extend(base_report.checks)
    base_config = getattr(base_report, "config", None)
    if base_config is None:
        lines.append(make_check("4 adapter fits the base", warn, "not checked: the base's config.json could not be"
                                " read", "fix the base model repo first"))
    elif shapes is None:
        lines.append(make_check("4 adapter fits the base", ok, "shapes are checked when the app loads (the adapter"
                                " weights are in LFS on a remote host: not downloaded now)"))
    else:
        try:
            problems = check_adapter_shapes(shapes, base_config, adapter)
        except (KeyError, TypeError, ValueError) as error:  # an unusual base config.json
            problems = [f"the base's config.json cannot be compared with the adapter ({type(error).__name__}:"
                        f" {error})"]
        if problems:
            shown = problems[0].rstrip(".") + (f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else "")
            lines.append(make_check("4 adapter fits the base", fail, shown, "answer the base_model_repo the adapter"
                                    " was trained on (same size: hidden size, layers, vocab, kv heads)"))
        else:
            lines.append(make_check("4 adapter fits the base", ok, f"{len(shapes)} adapter tensors match the base's"
                                    " hidden size, layers, kv heads and vocab"))
    return lines
