"""int8 against fp32 through the app over HTTP: one rendered app started twice (QUANTIZE=int8; DTYPE=float32 with
QUANTIZE=none) on the endless benchmark model, so every reply has exactly --tokens tokens; chats alternate between
the two servers; decode tokens/s as the page's reader sees them (first update to last).

    .venv/bin/python bench/int8_app.py [--tokens 128] [--runs 5] [--json FILE]
"""

from __future__ import annotations

import argparse
import shutil
import time

from app_bench import PROMPT, start_app, wait_ready
from common import OUT, endless_model, median, write
from sse_reader import QueueReader


def measure(tokens: int, runs: int) -> dict:
    from apprunner import render

    model = endless_model()
    work = OUT / "int8-app"
    shutil.rmtree(work, ignore_errors=True)
    app = render(work / "render", model_repo=str(model), hardware="cpu", validate_model_repo=False)
    settings = {"int8": {"QUANTIZE": "int8"}, "fp32": {"QUANTIZE": "none", "DTYPE": "float32"}}
    servers = {name: start_app(app, {"MODEL_PATH": str(model), **env}, work.with_suffix(f".{name}.log"))
               for name, env in settings.items()}
    rates = {name: [] for name in servers}
    try:
        readers = {}
        for name, server in servers.items():
            wait_ready(server.url, server.process, timeout=600)
            readers[name] = QueueReader(server.url, "/chat")
            readers[name].call(PROMPT, "", 8, 0.0, 0.8, 1.0)  # warm-up
        for run in range(runs):
            for name in (("int8", "fp32") if run % 2 == 0 else ("fp32", "int8")):
                time.sleep(0.5)
                got = readers[name].call(PROMPT, "", tokens, 0.0, 0.8, 1.0)
                if not got["text"]:
                    raise RuntimeError(f"{name}: empty reply")
                rates[name].append((tokens - 1) / max(got["elapsed"] - got["first"], 1e-9))
    finally:
        for server in servers.values():
            server.stop()
    return {"tokens": tokens, "runs": runs, "tok_s": {k: median(v) for k, v in rates.items()},
            "int8_over_fp32": median([a / b for a, b in zip(rates["int8"], rates["fp32"])]),
            "ratios": [round(a / b, 2) for a, b in zip(rates["int8"], rates["fp32"])]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--json")
    args = parser.parse_args()
    write(measure(args.tokens, args.runs), args.json)


if __name__ == "__main__":
    main()
