"""Where the page process spends its CPU while many users stream at once (engine=openai, paced server).

    PYTHONPATH=DIR .venv/bin/python bench/crowd_profile.py [--users 32] [--tokens 128] [--rate 25] [--limit 32]

DIR holds yappi (`pip install --target DIR yappi`: a profiler of every thread, not a dependency of the project).
The app runs as `python app.py` under yappi's CPU clock, switched on by SIGUSR1 just before the wave and
dumped by SIGUSR2 right after it, so start-up is not in the profile. Prints the functions by own CPU time and
by CPU time including callees, and the page's CPU seconds per 1000 tokens for that wave.
"""

from __future__ import annotations

import argparse
import os
import pstats
import signal
import time

import psutil
from common import OUT, PYTHON, child_env
from crowd_bench import measure_users, paced_source

# Becomes the rendered app's app.py; the real one is renamed app_main.py.
RUNNER = """
import os, runpy, signal, yappi
def on(*_):
    yappi.set_clock_type("cpu"); yappi.start(builtins=True)
def off(*_):
    yappi.stop(); yappi.get_func_stats().save(os.environ["PROFILE_TO"], type="pstat")
signal.signal(signal.SIGUSR1, on)
signal.signal(signal.SIGUSR2, off)
runpy.run_path("app_main.py", run_name="__main__")
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rate", type=float, default=25.0)
    parser.add_argument("--limit", type=int, default=0, help="CONCURRENCY_LIMIT (0: the app's default)")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    from apprunner import AppProcess, render

    work = OUT / "crowd-profile"
    work.mkdir(parents=True, exist_ok=True)
    source = paced_source(args.rate, args.tokens, work)
    profile = work / "page.pstat"
    profile.unlink(missing_ok=True)
    try:
        app_dir = render(work / f"render-{time.time_ns()}", engine="openai", engine_url=source.url,
                         engine_model=source.model, ui_language="en", validate_model_repo=False)
        (app_dir / "app.py").rename(app_dir / "app_main.py")
        (app_dir / "app.py").write_text(RUNNER, encoding="utf-8")
        env = {**child_env(), "PROFILE_TO": str(profile),
               **({"CONCURRENCY_LIMIT": str(args.limit)} if args.limit else {})}
        app = AppProcess(app_dir, env, work / "app.log", python=PYTHON)
        try:
            app.wait_stage(("ready",))
            measure_users(source, app.url, app.process.pid, 2, args.tokens, 1, lambda r: r["text"].count("word"))
            os.kill(app.process.pid, signal.SIGUSR1)
            time.sleep(0.5)
            page = psutil.Process(app.process.pid)
            figures = measure_users(source, app.url, app.process.pid, args.users, args.tokens, 1,
                                    lambda r: r["text"].count("word"))
            os.kill(app.process.pid, signal.SIGUSR2)
            deadline = time.monotonic() + 60
            while not profile.exists() and time.monotonic() < deadline:
                time.sleep(0.5)
            time.sleep(2)
            print({k: v for k, v in figures.items() if k != "wall_ratios"}, "page RSS MB",
                  page.memory_info().rss >> 20)
        finally:
            app.stop()
    finally:
        source.stop()
    stats = pstats.Stats(str(profile))
    stats.sort_stats("tottime").print_stats(args.top)
    stats.sort_stats("cumtime").print_stats(args.top)


if __name__ == "__main__":
    main()
