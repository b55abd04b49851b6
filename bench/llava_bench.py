"""LLaVA on the CPU: send -> first token, split into image encoding and prefill, then decode; with and without an image.

Shapes: InternLM2-chat-1.8B's LLM (as the app runs it: Llama layout, int8 Linears, embeddings in the compute dtype)
and CLIP-ViT-L/14-336's vision tower (24 layers, 1024 wide, 577 positions) in the CPU's best float, with the
tutorial's projector (1024 -> 2048 -> 2048). Random weights: speed does not depend on them. The app's own parts
run: Vision.embed (pad, CLIPImageProcessor, tower, hidden_states[-2], projector), llava.splice, the int8 model.
With an image the prompt is ~600 positions (576 patches + the question in InternLM2's chat format); without, the
question alone. Runs alternate (image, text, image, ...) and the medians are reported.

    nice python bench/llava_bench.py [--runs 3] [--decode 32] [--out bench/out/llava.json]
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
from pathlib import Path

from common import APP_SOURCE, clock, machine, median, write

sys.path.insert(0, str(APP_SOURCE))

QUESTION_TOKENS = 24  # '<|im_start|>user\n' ... '<|im_end|>\n<|im_start|>assistant\n' around a short question


def cpu_flags() -> str:
    flags = Path("/proc/cpuinfo").read_text().split("flags", 1)[1].split("\n", 1)[0]
    wanted = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "avx512_vnni", "avx_vnni")
    return " ".join(flag for flag in wanted if f" {flag}" in flags + " ")


def build_llm():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from xlab_chat.engines import int8

    config = LlamaConfig(vocab_size=92544, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                         num_attention_heads=16, num_key_value_heads=8, max_position_embeddings=32768,
                         rope_theta=1e6, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    compute = int8.preferred_compute_dtype()
    for name, module in list(model.named_modules()):  # one layer at a time: never a whole float copy in memory
        for pname, param in list(module.named_parameters(recurse=False)):
            fresh = torch.randn(param.shape, dtype=torch.bfloat16) * 0.02 if "norm" not in name else \
                torch.ones(param.shape)
            setattr(module, pname, torch.nn.Parameter(fresh.to(compute), requires_grad=False))
        if isinstance(module, torch.nn.Linear):
            int8.quantize_loaded_linears_(model, skip=int8.KEEP_FLOAT)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=config)
    return model.eval(), compute


def build_vision(dtype):
    from torch import nn
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
    from xlab_chat.engines.llava import Vision

    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                              num_attention_heads=16, image_size=336, patch_size=14, hidden_act="quick_gelu")
    tower = CLIPVisionModel(config).to(dtype).eval()
    with tempfile.TemporaryDirectory() as folder:  # the openai repo's preprocessor_config.json, 336 px
        CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                           image_mean=[0.48145466, 0.4578275, 0.40821073],
                           image_std=[0.26862954, 0.26130258, 0.27577711]).save_pretrained(folder)
        from xlab_chat.engines.llava import image_processor

        processor = image_processor(Path(folder))
    projector = nn.Sequential(nn.Linear(1024, 2048), nn.GELU(), nn.Linear(2048, 2048)).to(dtype).eval()
    return Vision(tower, processor, projector, dtype)


def photo() -> bytes:
    from PIL import Image

    image = Image.effect_noise((640, 480), 64).convert("RGB")
    out = io.BytesIO()
    image.save(out, "JPEG")
    return out.getvalue()


def one_run(model, vision, data: bytes, with_image: bool, decode: int) -> dict:
    import torch
    from transformers import DynamicCache
    from xlab_chat.engines.llava import IMAGE_MARK, splice

    ids = [1] + list(range(1000, 1000 + QUESTION_TOKENS // 2))
    ids += ([IMAGE_MARK] if with_image else []) + list(range(2000, 2000 + QUESTION_TOKENS // 2))
    embedding = model.get_input_embeddings()
    with torch.inference_mode():
        start = clock()
        features = [vision.embed(data)] if with_image else []
        encoded = clock()
        embeds = splice(embedding, ids, features)
        cache = DynamicCache()
        logits = model(inputs_embeds=embeds, past_key_values=cache, use_cache=True).logits[:, -1]
        first = clock()
        token = logits.argmax(-1, keepdim=True)
        for _ in range(decode):
            token = model(input_ids=token, past_key_values=cache, use_cache=True).logits[:, -1].argmax(-1, keepdim=True)
        done = clock()
    return {"positions": embeds.shape[1], "image_s": encoded - start, "prefill_s": first - encoded,
            "first_token_s": first - start, "decode_tok_s": decode / (done - first)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--decode", type=int, default=32)
    parser.add_argument("--out", default="")
    args = parser.parse_args()
    import torch
    from xlab_chat.engines.transformers_engine import cpu_runs_bf16_well

    started = clock()
    model, compute = build_llm()
    vision_dtype = torch.bfloat16 if cpu_runs_bf16_well() else torch.float32
    vision = build_vision(vision_dtype)
    built = clock() - started
    data = photo()
    one_run(model, vision, data, True, 2)  # warm up both paths once
    one_run(model, vision, data, False, 2)
    runs = {"image": [], "text": []}
    for _ in range(args.runs):
        runs["image"].append(one_run(model, vision, data, True, args.decode))
        runs["text"].append(one_run(model, vision, data, False, args.decode))
    summary = {kind: {key: round(median([r[key] for r in rows]), 3) for key in rows[0]} for kind, rows in runs.items()}
    write({"machine": machine(), "cpu_flags": cpu_flags(), "threads": torch.get_num_threads(),
           "llm": f"1.8B-shaped, int8 Linears, {str(compute).replace('torch.', '')} activations",
           "tower": f"CLIP-L/14-336-shaped, {str(vision_dtype).replace('torch.', '')}", "build_s": round(built, 1),
           "runs": args.runs, "median": summary, "all": runs}, args.out)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
