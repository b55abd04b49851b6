"""Deploying a LoRA adapter against deploying the merged model of the same fine-tune (issue: adapters).

    .venv/bin/python bench/adapter_bench.py [--json FILE]

A 565M InternLM2-shaped base (bf16, 4 shards, random weights: bench/int8_cpu.py builds it) and an XTuner-shaped
adapter for it (r=64, alpha=16, every Linear including the output head, fp16, as `xtuner convert pth_to_hf`
writes), and the merged model of the two (what `xtuner convert merge` gives), each in a bare LFS repo served over
loopback HTTP by the counting host. The app (CPU) starts on each, fresh folders, alternating: bytes the host sent
and seconds to the first reply. The adapter deploy is measured twice: with the base to download, and with the
base already on disk (BASE_MODEL_DIR shared by several apps on one machine).
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Optional

from app_bench import TOKEN, USER, CountingHost, chat, start_app, wait_ready
from common import OUT, clock, median, write
from int8_cpu import build as build_base

RANK, ALPHA = 64, 16
TARGETS = ["wqkv", "wo", "w1", "w2", "w3", "output"]


def build_adapter(base: Path, folder: Path) -> Path:
    """peft's saved layout for an XTuner InternLM2 QLoRA adapter, with non-zero, trained-looking updates."""
    import torch
    from safetensors.torch import save_file

    if (folder / "adapter_model.safetensors").exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    config = json.loads((base / "config.json").read_text())
    hidden, inter, layers = config["hidden_size"], config["intermediate_size"], config["num_hidden_layers"]
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    rows = (heads + 2 * kv) * (hidden // heads)
    shapes = {"attention.wqkv": (hidden, rows), "attention.wo": (hidden, hidden), "feed_forward.w1": (hidden, inter),
              "feed_forward.w3": (hidden, inter), "feed_forward.w2": (inter, hidden)}
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    modules = [(f"model.layers.{i}.{name}", shape) for i in range(layers) for name, shape in shapes.items()]
    modules.append(("output", (hidden, config["vocab_size"])))
    for module, (fan_in, fan_out) in modules:
        key = f"base_model.model.{module}"
        tensors[f"{key}.lora_A.weight"] = (torch.randn(RANK, fan_in, generator=generator) / fan_in ** 0.5).half()
        tensors[f"{key}.lora_B.weight"] = (torch.randn(fan_out, RANK, generator=generator) * 0.01).half()
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.1,
        "bias": "none", "target_modules": TARGETS, "base_model_name_or_path": "/root/ft/model",
        "fan_in_fan_out": False, "modules_to_save": None, "use_rslora": False, "use_dora": False}))
    (folder / "xtuner_config.py").write_text("# the XTuner config the adapter was trained with\n")
    (folder / "README.md").write_text("adapter\n")
    return folder


def build_merged(base: Path, adapter: Path, folder: Path) -> Path:
    """The merged checkpoint, shard for shard, with the app's own merge (equal to peft's, tests/test_lora.py)."""
    if (folder / "model.safetensors.index.json").exists():
        return folder
    import torch
    from safetensors.torch import save_file
    from xlab_chat.engines import internlm2, lora  # common put the app on sys.path

    shutil.copytree(base, folder)
    loaded = lora.load_adapter(adapter, json.loads((base / "config.json").read_text()))
    for path in internlm2._shard_files(base):
        tensors = internlm2._read_shard(path, torch.bfloat16)
        lora.merge_into(tensors, loaded)
        save_file(tensors, str(folder / path.name), metadata={"format": "pt"})
    return folder


def deploy(app: Path, host: CountingHost, repo: str, work: Path, base_repo: str = "",
           base_dir: Optional[Path] = None) -> dict:
    env = {"MODEL_REPO": host.url(repo), "MODEL_REPO_USER": USER, "MODEL_REPO_TOKEN": TOKEN,
           "MODEL_DIR": str(work / "model"), "HARDWARE": "cpu", "QUANTIZE": "none", "DTYPE": "bfloat16"}
    if base_repo:
        env.update(BASE_MODEL_REPO=host.url(base_repo), BASE_MODEL_DIR=str(base_dir))
    before = host.bytes
    started = clock()
    server = start_app(app, env, work.with_suffix(".log"))
    try:
        ready = wait_ready(server.url, server.process, timeout=1200)
        if not chat(ready["client"], 1)["text"]:
            raise RuntimeError("no reply")
        return {"bytes": host.bytes - before, "first_reply_s": clock() - started}
    finally:
        server.stop()


def measure(runs: int) -> dict:
    from apprunner import render

    work = OUT / "adapter-bench"
    base = build_base()
    adapter = build_adapter(base, OUT / "adapter-565m")
    merged = build_merged(base, adapter, OUT / "merged-565m")
    host_root = work / "host"
    if not (host_root / "merged.git" / "HEAD").exists():
        import tinymodel

        shutil.rmtree(host_root, ignore_errors=True)
        host_root.mkdir(parents=True)
        for name, folder in (("base", base), ("adapter", adapter), ("merged", merged)):
            tinymodel.publish(folder, host_root / f"{name}.git")
    app = render(work / "render", model_repo="https://example.invalid/unused.git", hardware="cpu",
                 validate_model_repo=False)
    results = {"merged": [], "adapter_cold": [], "adapter_shared_base": []}
    with CountingHost(host_root) as host:
        for run in range(runs):
            for kind in ("merged", "adapter_cold", "adapter_shared_base") if run % 2 == 0 else (
                    "adapter_shared_base", "adapter_cold", "merged"):
                place = work / f"{kind}-{run}"
                shutil.rmtree(place, ignore_errors=True)
                place.mkdir(parents=True)
                shared = work / "shared-base"
                if kind == "merged":
                    results[kind].append(deploy(app, host, "merged.git", place))
                elif kind == "adapter_cold":
                    results[kind].append(deploy(app, host, "adapter.git", place, "base.git", place / "base"))
                else:
                    if not (shared / "config.json").exists():  # set up once, not measured
                        deploy(app, host, "adapter.git", work / "prime", "base.git", shared)
                    results[kind].append(deploy(app, host, "adapter.git", place, "base.git", shared))
                time.sleep(1)
    summary = {kind: {"bytes": median([r["bytes"] for r in rows]), "first_reply_s": median(
        [r["first_reply_s"] for r in rows])} for kind, rows in results.items()}
    merged_row = summary["merged"]
    return {
        "runs": runs, "summary": summary,
        "adapter_file_mb": round((adapter / "adapter_model.safetensors").stat().st_size / 1e6, 1),
        "merged_weights_mb": round(sum(p.stat().st_size for p in merged.glob("*.safetensors")) / 1e6, 1),
        "bytes_ratio_cold": summary["adapter_cold"]["bytes"] / merged_row["bytes"],
        "bytes_ratio_shared_base": summary["adapter_shared_base"]["bytes"] / merged_row["bytes"],
        "first_reply_ratio_cold": summary["adapter_cold"]["first_reply_s"] / merged_row["first_reply_s"],
        "first_reply_ratio_shared_base": summary["adapter_shared_base"]["first_reply_s"] / merged_row["first_reply_s"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--json")
    args = parser.parse_args()
    write(measure(args.runs), args.json)


if __name__ == "__main__":
    main()
