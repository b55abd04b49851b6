"""engine=llamacpp: run the model on the CPU with llama.cpp, through llama-cpp-python's OpenAI-compatible server.

The verified model folder is converted once to GGUF (engines/gguf_convert.py), then quantized by llama.cpp's
own quantizer (Q4_K_M for QUANTIZE=auto, Q8_0 for int8), in a child process under the guard, so the page
stays light and an interrupted conversion leaves only ``.partial`` files that the next start removes. The
result is kept and checked beside the model (model/gguf_cache.py); a repo that ships a ``.gguf`` is run as
it is.

The server's defaults suit one user on a big machine; a 2-vCPU tier with many users needs others
(llama_cpp/server/settings.py, 0.3.36): ``n_threads`` defaults to half the cores, ``use_mlock`` pins the
model in RAM, ``logits_all`` keeps every position's logits, and ``interrupt_requests`` ends the running
reply whenever another request arrives. Requests are served one at a time, in order.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List, Optional

from ..model import gguf_cache
from .openai_api import EndpointError
from .process import APP_FOLDER, describe_exit

CONTEXT = 4096  # tokens: a long chat at the app's defaults; ENGINE_ARGS "--n_ctx 8192" raises it
INSTALL_FIX = ("install it with `pip install -r requirements.txt` (it builds llama.cpp: needs cmake and a C++"
               " compiler, about 15 CPU-minutes)")


def cpu_budget() -> int:
    """The cores this process may use: its CPU affinity, capped by a container's CPU quota (cgroup v2), which
    free tiers set while os.cpu_count() still shows the host's cores."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass
    return max(1, count)


def gguf_for(folder: Path, quantize: str, env: dict, progress: Callable[[str], None] = lambda stage: None) -> Path:
    """The GGUF to run: the repo's own, the verified cached one, or a new one made now."""
    kind = gguf_cache.gguf_type(quantize)
    shipped = gguf_cache.repo_gguf(folder, kind)
    if shipped is not None:
        print(f"[engine] running the repo's own {shipped.name}", flush=True)
        return shipped
    target = gguf_cache.cached_path(folder, kind)
    why = gguf_cache.why_not_current(folder, target, kind)
    if not why:
        print(f"[engine] {target.name} is current (made from this model, checked)", flush=True)
        return target
    print(f"[engine] making {target.name}: {why}", flush=True)
    progress("converting")
    gguf_cache.forget(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    # Under the guard, whose open stdin ties the conversion to this process: it ends if the page ends.
    child = subprocess.Popen([sys.executable, "-m", "xlab_chat.engines.guard", sys.executable, "-m",
                              "xlab_chat.engines.llamacpp", str(folder), str(target), kind],
                             stdin=subprocess.PIPE, cwd=str(APP_FOLDER), env=env)
    code = child.wait()
    child.stdin.close()
    if code != 0 or not target.is_file():
        gguf_cache.forget(target)
        raise EndpointError(f"the model could not be converted to GGUF ({describe_exit(code)})",
                            "the log above says why; a repo may also ship its own .gguf file")
    gguf_cache.record(folder, target, kind)
    progress("starting")
    print(f"[engine] made {target.name} ({target.stat().st_size / 1e9:.2f} GB) in"
          f" {time.monotonic() - started:.0f} s", flush=True)
    return target


def server_argv(folder: Path, port: int, host: str, quantize: str, env: dict,
                progress: Callable[[str], None] = lambda stage: None) -> List[str]:
    """``python -m llama_cpp.server`` on the model's GGUF, with settings for a small CPU and many users."""
    if importlib.util.find_spec("llama_cpp") is None:  # asked, not imported: the server runs in its own process
        raise EndpointError("llama-cpp-python is not installed", INSTALL_FIX)
    gguf = gguf_for(folder, quantize, env, progress)
    threads = str(cpu_budget())
    return [sys.executable, "-m", "llama_cpp.server", "--model", str(gguf), "--model_alias", str(folder),
            "--host", host, "--port", str(port), "--n_ctx", str(CONTEXT), "--n_threads", threads,
            "--n_threads_batch", threads, "--use_mlock", "false", "--logits_all", "false",
            "--interrupt_requests", "false"]


def describe(argv: List[str]) -> str:
    """What the page header adds for a llama.cpp server, e.g. "CPU · Q4_K_M"; "" for any other server."""
    if "llama_cpp.server" not in argv:
        return ""
    gguf = Path(argv[argv.index("--model") + 1])
    made = gguf.parent.name.endswith("-gguf") and gguf.stem.startswith("model-")
    return f"CPU · {gguf.stem[len('model-'):] if made else gguf.name}"


def convert_and_quantize(folder: Path, target: Path, kind: str) -> None:
    """The child's work: GGUF in the weights' own type, then llama.cpp's quantizer; only ``.partial`` files
    exist until the finished one is renamed into place."""
    from .gguf_convert import convert

    plain = target.with_name(f"{target.name}.partial-float-{os.getpid()}")
    quantized = target.with_name(f"{target.name}.partial-{os.getpid()}")
    started = time.monotonic()
    try:
        convert(folder, plain)
        print(f"[convert] wrote {plain.stat().st_size / 1e9:.2f} GB in {time.monotonic() - started:.0f} s", flush=True)
        if kind == gguf_cache.GGUF_TYPES["none"]:
            os.replace(plain, target)
            return
        quantize(plain, quantized, kind)
        os.replace(quantized, target)
    finally:
        for path in (plain, quantized):
            path.unlink(missing_ok=True)


def quantize(source: Path, out: Path, kind: str) -> None:
    import llama_cpp

    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{kind}")
    params.nthread = cpu_budget()
    if llama_cpp.llama_model_quantize(str(source).encode(), str(out).encode(), ctypes.byref(params)) != 0:
        raise RuntimeError(f"llama.cpp could not quantize {source.name} to {kind}")


def main(argv: Optional[List[str]] = None) -> int:
    folder, target, kind = (argv or sys.argv[1:])[:3]
    from .gguf_convert import ConversionError

    try:
        convert_and_quantize(Path(folder), Path(target), kind)
    except ConversionError as error:
        print(f"ERROR: {error}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
