"""Check the engine: it can run this repo on this hardware (9), or, for engine=openai, its server answers."""

from __future__ import annotations

from typing import Optional

from .endpoint import Endpoint, EndpointError, check_endpoint
from .listing import Listing
from .llamacpp_check import repo_verdict
from .report import FAIL, OK, WARN, Check, Report, check_timeout

GPU_ENGINES = {"lmdeploy": "LMDeploy", "vllm": "vLLM"}


def quantization(listing: Listing, config: Optional[dict]) -> str:
    """What 4-bit format the repo holds, in words ("4-bit AWQ", "an LMDeploy TurboMind export"), or ""."""
    if any(name.startswith(("triton_models/", "turbomind/")) for name in listing.sizes):
        return "an LMDeploy TurboMind export"
    quant = (config or {}).get("quantization_config")
    if not isinstance(quant, dict):
        return ""
    method = str(quant.get("quant_method") or quant.get("quant_type") or "quantized").upper()
    bits = quant.get("w_bit", quant.get("bits"))
    return f"a {bits}-bit {method} model" if bits else f"a {method} model"


def check_engine(listing: Listing, config: Optional[dict], engine: str, hardware: str) -> Optional[Check]:
    """The engine can run this repo on this hardware: GPU servers need a GPU, 4-bit repos need a GPU server."""
    title = f"9 engine {engine}"
    quantized = quantization(listing, config)
    if engine in GPU_ENGINES and hardware == "cpu":
        return Check(title, FAIL, f"{GPU_ENGINES[engine]} runs only on Linux x86_64 with an NVIDIA GPU (CUDA), and"
                     " hardware is cpu", "answer hardware a10-24gb or a100-40gb, or engine=transformers for the CPU"
                     " (int8 weights)")
    if quantized and engine == "transformers":
        return Check(title, FAIL, f"{quantized}: transformers does not run it here",
                     "answer engine=lmdeploy (or vllm) on a GPU")
    if engine in GPU_ENGINES:
        what = f"{quantized} for {GPU_ENGINES[engine]}" if quantized else GPU_ENGINES[engine]
        return Check(title, OK, f"{what}; needs Linux x86_64 with an NVIDIA GPU (CUDA)")
    if engine == "llamacpp":
        usable, detail, fix = repo_verdict(list(listing.sizes), config)
        return Check(title, OK if usable else FAIL, detail, fix)
    return None


def check_endpoint_report(url: str, model: str, api_key: str = "", timeout: Optional[float] = None) -> Report:
    """ENGINE=openai: the server answers, accepts the key and serves the model (nothing is downloaded)."""
    report = Report(url, "-", "-", heading=f"Engine server check: {url} (model {model})")
    titles = ("1 server reachable", "2 API key accepted", "3 model served")
    try:
        endpoint = Endpoint.from_url(url, model, api_key)
        verdict, names = check_endpoint(endpoint, min(check_timeout() if timeout is None else timeout, 20.0))
    except EndpointError as error:
        if error.status in (401, 403):
            report.checks += [Check(titles[0], OK, "answered"), Check(titles[1], FAIL, error.what, error.fix)]
        elif error.status:
            report.checks += [Check(titles[0], FAIL, error.what, error.fix)]
        else:  # unreachable from here: a cluster address may be reachable only where the app runs
            report.unreachable = True
            report.checks += [Check(titles[0], WARN, f"not checked: {error.what}", error.fix)]
        return report
    report.checks += [Check(titles[0], OK, f"{endpoint.base} answered"),
                      Check(titles[1], OK, "accepted" if api_key else "no key needed")]
    if verdict == "unlisted":
        shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
        report.checks.append(Check(titles[2], FAIL, f"{model!r} is not among the models it lists ({shown})",
                                   "answer engine_model (or set ENGINE_MODEL) with one of those names"))
    elif verdict == "unknown":
        report.checks.append(Check(titles[2], WARN, "the server lists no models, so the name was not checked",
                                   "make sure ENGINE_MODEL is the name the server expects"))
    else:
        report.checks.append(Check(titles[2], OK, f"{model} is listed"))
    return report
