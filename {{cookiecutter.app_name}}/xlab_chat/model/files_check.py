"""Check the repo's own files: config.json and its model type, the tokenizer, the chat template, the weights.

Checks 2 to 5 of the repo check, and ModelScope's configuration.json (8); all read from a Listing.
"""

from __future__ import annotations

import re
from typing import List, Optional, Set, Tuple

from .listing import Listing
from .report import FAIL, OK, WARN, Check, human_bytes

# Model types transformers runs without the repo's code (stdlib list: transformers is not imported here).
# internlm2 is here because the app's native loader runs it as a Llama model.
KNOWN_MODEL_TYPES = frozenset((
    "llama", "mistral", "mixtral", "ministral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
    "gemma3", "gemma3_text", "phi", "phi3", "phimoe", "gpt2", "gpt_neox", "gpt_neox_japanese", "gptj", "gpt_neo",
    "gpt_bigcode", "gpt_oss", "falcon", "falcon_mamba", "bloom", "opt", "mpt", "starcoder2", "stablelm", "olmo",
    "olmo2", "olmo3", "olmoe", "cohere", "cohere2", "granite", "granitemoe", "granitemoeshared", "deepseek_v2",
    "deepseek_v3", "glm", "glm4", "glm4_moe", "helium", "nemotron", "persimmon", "recurrent_gemma", "jamba", "mamba",
    "mamba2", "dbrx", "codegen", "xglm", "biogpt", "ctrl", "exaone4", "hunyuan_v1_dense", "hunyuan_v1_moe",
    "ernie4_5", "ernie4_5_moe", "smollm3", "arcee", "apertus", "seed_oss", "bitnet", "zamba", "zamba2", "diffllama",
    "minimax", "internlm2",
))
CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")


def _auto_map_files(auto_map: object) -> Tuple[Set[str], Set[str]]:
    """(module files named, other repos named) by an auto_map: {"AutoModel": "modeling_x.Cls" | [..]}."""
    files, repos = set(), set()
    if not isinstance(auto_map, dict):
        return files, repos
    for value in auto_map.values():
        for reference in value if isinstance(value, (list, tuple)) else [value]:
            if not isinstance(reference, str) or "." not in reference:
                continue
            if "--" in reference:
                repo, reference = reference.split("--", 1)
                repos.add(repo)
                continue
            files.add(reference.rsplit(".", 1)[0].replace(".", "/") + ".py")
    return files, repos


def check_config(listing: Listing, loader: str) -> Tuple[Check, Optional[dict]]:
    title = "2 config.json and model type"
    config, problem = listing.read_json("config.json")
    if config is None:
        return Check(title, FAIL, problem, "point model_repo at a complete transformers model (config.json at the"
                     " top of the repo)"), None
    model_type = str(config.get("model_type") or "")
    if not model_type:
        return Check(title, FAIL, "config.json has no model_type", "use a transformers model repo"), config
    code, other_repos = _auto_map_files(config.get("auto_map"))
    missing = sorted(f for f in code if not listing.has(f))
    known = model_type in KNOWN_MODEL_TYPES
    arch = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    notes = f"model_type {model_type}" + (f", {', '.join(arch)}" if arch else "")
    missing_fix = f"add {', '.join(missing)} to the repo (auto_map in config.json names them)"
    if loader == "remote-code" and config.get("auto_map"):
        if missing:
            return Check(title, FAIL, f"{notes}; the repo's code is missing: {', '.join(missing)}", missing_fix), config
        extra = f"; auto_map also uses code from {', '.join(sorted(other_repos))}" if other_repos else ""
        check = Check(title, WARN if other_repos else OK, f"{notes}; runs with the repo's own code{extra}",
                      "make sure that repo can be reached too")
    elif known:
        check = Check(title, OK, f"{notes}; transformers runs it without the repo's code")
        if missing:
            check = Check(title, WARN, f"{notes}; auto_map names files that are not in the repo: {', '.join(missing)}",
                          "only loader=remote-code uses them; " + missing_fix)
    elif config.get("auto_map") and not missing:
        return Check(title, FAIL, f"{notes}: transformers does not know this model type; it needs the repo's code",
                     "answer loader=remote-code (or set LOADER=remote-code)"), config
    elif config.get("auto_map"):
        return Check(title, FAIL, f"{notes}: unknown model type and its code is missing: {', '.join(missing)}",
                     missing_fix), config
    else:
        return Check(title, FAIL, f"{notes}: transformers does not know this model type and the repo has no code"
                     " for it (no auto_map)", "use a model transformers supports (Llama, Qwen2, InternLM2, …)"), config
    if check.status == OK and arch and not any(a.endswith(CAUSAL_SUFFIXES) for a in arch):
        check = Check(title, WARN, f"{notes}: not a causal language model", "use a chat (causal LM) model")
    return check, config


def check_tokenizer(listing: Listing, loader: str) -> Tuple[Check, Optional[dict]]:
    title = "3 tokenizer"
    present = [n for n in ("tokenizer.model", "tokenizer.json") if listing.has(n)]
    if not present and listing.has("vocab.json") and listing.has("merges.txt"):
        present = ["vocab.json", "merges.txt"]
    present += [n for n in listing.sizes if n.endswith(".tiktoken") and "/" not in n]
    tok_config, problem = listing.read_json("tokenizer_config.json")
    if not present:
        fix = "upload the tokenizer files with the model (save_pretrained of the tokenizer writes them)"
        return Check(title, FAIL, "no tokenizer.model or tokenizer.json", fix), tok_config
    if tok_config is None:
        return Check(title, WARN, f"{', '.join(present)}, but {problem}",
                     "upload tokenizer_config.json (it holds the special tokens and the chat template)"), None
    code, _ = _auto_map_files(tok_config.get("auto_map"))
    missing = sorted(f for f in code if not listing.has(f))
    if missing and loader == "remote-code":
        return Check(title, FAIL, f"tokenizer_config.json's auto_map names missing files: {', '.join(missing)}",
                     f"add {', '.join(missing)} to the repo"), tok_config
    return Check(title, OK, f"{', '.join(present)} and tokenizer_config.json"), tok_config


def check_chat_template(listing: Listing, tok_config: Optional[dict], config: Optional[dict]) -> Check:
    title = "4 chat template"
    if tok_config and tok_config.get("chat_template"):
        return Check(title, OK, "in tokenizer_config.json")
    for name in ("chat_template.jinja", "chat_template.json"):
        if listing.has(name):
            return Check(title, OK, f"in {name}")
    if config and config.get("model_type") == "internlm2":
        return Check(title, OK, "none in the repo; the app knows InternLM2's chat format")
    return Check(title, WARN, "none found; the app will format chats the InternLM2 way, which this model may not know",
                 "use a chat (instruct) model, or add chat_template to tokenizer_config.json")


_SHARD = re.compile(r"-\d{5}-of-\d{5}\.(safetensors|bin)$")
_NOT_WEIGHTS = ("training_args.bin", "optimizer.bin", "scheduler.bin", "rng_state.bin")


def _weight_files(listing: Listing) -> Tuple[List[str], Optional[Check]]:
    """The files the loader would read, or a ✗ check that says why there are none."""
    title = "5 weights"
    top = [n for n in listing.sizes if "/" not in n]
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name not in listing.sizes:
            continue
        index, problem = listing.read_json(index_name)
        if index is None:
            return [], Check(title, FAIL, problem, "upload a valid index with the shards")
        weight_map = index.get("weight_map")
        shards = sorted(set(weight_map.values())) if isinstance(weight_map, dict) else []
        if not shards:
            return [], Check(title, FAIL, f"{index_name} names no shards", "upload a valid index with the shards")
        missing = [s for s in shards if not listing.has(s)]
        if missing:
            return [], Check(title, FAIL, f"{index_name} names {len(missing)} shard(s) that are not in the repo:"
                             f" {', '.join(missing[:3])}", "upload every shard the index lists")
        total = (index.get("metadata") or {}).get("total_size")
        stored = sum(listing.sizes[s] for s in shards)
        if isinstance(total, (int, float)) and total > stored:
            return [], Check(title, FAIL, f"{index_name} promises {total:,} bytes of tensors but the shards hold"
                             f" {stored:,}", "upload the shards again (one is truncated or stale)")
        return shards, None
    safetensors = sorted(n for n in top if n.endswith(".safetensors"))
    bins = sorted(n for n in top if n.endswith(".bin") and n not in _NOT_WEIGHTS and not n.startswith("optimizer"))
    files = safetensors or bins
    if not files:
        adapter = listing.has("adapter_config.json")
        fix = ("this is a LoRA adapter without its weights: upload adapter_model.safetensors (or .bin)"
               if adapter else "push the weights (*.safetensors) with git lfs")
        return [], Check(title, FAIL, "no weights (*.safetensors or *.bin)", fix)
    if any(_SHARD.search(n) for n in files):
        kind = "model.safetensors.index.json" if safetensors else "pytorch_model.bin.index.json"
        return [], Check(title, FAIL, f"sharded weights without {kind}", f"upload {kind} with the shards")
    return files, None


def check_weights(listing: Listing) -> Tuple[Check, List[str]]:
    files, failure = _weight_files(listing)
    if failure:
        return failure, []
    total = sum(listing.sizes[f] for f in files)
    what = files[0] if len(files) == 1 else f"{len(files)} shards"
    return Check("5 weights", OK, f"{what}, {human_bytes(total)}"), files


def check_modelscope(listing: Listing) -> Check:
    title = "8 ModelScope configuration.json"
    if listing.has("configuration.json"):
        return Check(title, OK, "present")
    return Check(title, WARN, "missing; ModelScope's pages and SDK expect it",
                 'add configuration.json with {"framework": "pytorch", "task": "text-generation"}')
