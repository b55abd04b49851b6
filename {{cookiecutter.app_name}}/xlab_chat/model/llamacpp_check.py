"""What engine=llamacpp asks of the template's answers and of the model repo, before anything is deployed.

Standard library only (the hooks run it). llama-cpp-python is built for the CPU by requirements.txt, and the
app converts float InternLM2 and Llama checkpoints to GGUF itself; a repo may instead ship its own .gguf.
"""

from __future__ import annotations

from typing import Iterable, List, Mapping, Optional, Tuple

CONVERTED_ARCHITECTURES = ("InternLM2ForCausalLM", "LlamaForCausalLM")
GPU_HARDWARE = ("a10-24gb", "a100-40gb")
ADD_GGUF = "add a .gguf file (e.g. made with llama.cpp's convert_hf_to_gguf.py) to the model repo"


def answer_problems(answers: Mapping[str, object]) -> List[Tuple[str, str]]:
    """(what, fix) for answers engine=llamacpp cannot serve; empty for any other engine."""
    if answers.get("engine") != "llamacpp" or answers.get("hardware") not in GPU_HARDWARE:
        return []
    return [(f"engine=llamacpp runs on the CPU, but hardware is {answers.get('hardware')}",
             "answer hardware cpu (or auto), or engine=lmdeploy, vllm or transformers for the GPU")]


def repo_verdict(file_names: Iterable[str], config: Optional[dict]) -> Tuple[bool, str, str]:
    """(usable, detail, fix) for a model repo under engine=llamacpp, from its file names and config.json."""
    names = list(file_names)
    ggufs = sorted(name for name in names if name.lower().endswith(".gguf"))
    if ggufs:
        return True, f"ships {ggufs[0]}" + (f" and {len(ggufs) - 1} more .gguf" if len(ggufs) > 1 else "") + \
            ", run as it is", ""
    config = config or {}
    quant = config.get("quantization_config")
    if isinstance(quant, dict):
        method = str(quant.get("quant_method") or "quantized").upper()
        return False, f"a {method} checkpoint: the app converts float weights only", \
            f"deploy the float model it was made from, or {ADD_GGUF}"
    architecture = (config.get("architectures") or [""])[0]
    if architecture not in CONVERTED_ARCHITECTURES:
        return False, f"{architecture or 'an unknown architecture'}: the app converts " \
            f"{' and '.join(CONVERTED_ARCHITECTURES)} only", ADD_GGUF
    if "tokenizer.model" not in names:
        return False, "no tokenizer.model: the app's GGUF converter reads the sentencepiece tokenizer", \
            ADD_GGUF
    return True, "converted once to GGUF on the first start, kept beside the model", ""
