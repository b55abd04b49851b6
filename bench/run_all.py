"""Run every benchmark, print the table and write bench/results.md (not part of CI).

Usage: .venv/bin/python bench/run_all.py [--quick]

Each part runs in its own interpreter and hands back JSON; every figure is a ratio (or a difference) of two
things measured side by side in the same run, alternating, median of several runs, so that the noise of a
shared machine hits both sides.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Optional

from common import BENCH, OUT, PYTHON, child_env, clock, machine

MiB = 1024 * 1024


def run_part(script: str, args: list, name: str) -> dict:
    target = OUT / f"{name}.json"
    target.unlink(missing_ok=True)
    started = clock()
    print(f"== {script} {' '.join(args)}", flush=True)
    done = subprocess.run([PYTHON, str(BENCH / script), *args, "--json", str(target)], env=child_env(),
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, check=False)
    if done.returncode != 0 or not target.exists():
        print(done.stderr[-3000:], file=sys.stderr)
        return {"error": f"{script} failed with exit code {done.returncode}"}
    print(f"   {clock() - started:.0f} s, load average {' '.join(load_average())}", flush=True)
    results = json.loads(target.read_text(encoding="utf-8"))
    results["load_average_after"] = " ".join(load_average())
    target.write_text(json.dumps(results, indent=1), encoding="utf-8")
    return results


def load_average() -> list:
    path = Path("/proc/loadavg")
    return path.read_text().split()[:3] if path.exists() else []


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def spread(values: list, digits: int = 2) -> str:
    return f"{min(values):.{digits}f}–{max(values):.{digits}f}" if values else "?"


def rows(app: dict, dm: dict, loaders: dict, engine: dict, int8: Optional[dict] = None,
         engines: Optional[dict] = None, adapter: Optional[dict] = None) -> list:
    """(figure, measured, goal, result) for the table."""
    out = []
    if "error" not in app:
        out.append(("stream efficiency (gradio_client)", f"**{app['stream_efficiency']:.2f}** (HTTP "
                    f"{app['http_tok_s']:.1f} tok/s ÷ plain generate {app['plain_tok_s']:.1f} tok/s; runs "
                    f"{spread(app['stream_ratios'])})", "≥ 0.95", verdict(app["stream_efficiency"] >= 0.95)))
        if "reader_stream_efficiency" in app:
            out.append(("stream efficiency (browser-like reader)", f"{app['reader_stream_efficiency']:.2f} (HTTP "
                        f"{app['reader_http_tok_s']:.1f} tok/s; runs {spread(app['reader_stream_ratios'])})",
                        "report", "—"))
            out.append(("time to first token (browser-like reader)", f"**{app['reader_ttft_delta_ms']:+.0f} ms** "
                        f"(first HTTP update {app['reader_ttft_http_ms']:.0f} ms − direct generate's first token "
                        f"{app['ttft_plain_ms']:.0f} ms; a do-nothing endpoint's round trip "
                        f"{app['reader_status_round_trip_ms']:.0f} ms)",
                        "≤ 50 ms", verdict(app["reader_ttft_delta_ms"] <= 50)))
        out.append(("time to first token (gradio_client)", f"{app['ttft_delta_ms']:+.0f} ms (first update "
                    f"{app['ttft_http_ms']:.0f} ms; a do-nothing endpoint's round trip "
                    f"{app.get('status_round_trip_ms', float('nan')):.0f} ms: the client checks for messages every "
                    "50 ms)", "report", "—"))
        phases = app["warm_phases"]
        out.append(("warm start", f"**{app['warm_start']:.2f}** (`python app.py` → first reply "
                    f"{app['warm_app_s']:.1f} s"
                    f" [page served {phases['serving_s']:.1f} s, model ready {phases['ready_s']:.1f} s] ÷ bare script "
                    f"{app['bare_s']:.1f} s; `import gradio` alone {app['import_gradio_s']:.1f} s)",
                    "≤ 1.15", verdict(app["warm_start"] <= 1.15)))
        if "page_rss_mb" in app:
            out.append(("page process", f"**{app['page_rss_mb']} MB** RSS, torch mapped: {app['page_maps_torch']}",
                        "≤ 400 MB, no torch", verdict(app["page_rss_mb"] <= 400 and not app["page_maps_torch"])))
        if "crash_over_warm" in app:
            out.append(("crash → reply again ÷ warm start", f"**{app['crash_over_warm']:.2f}** (kill -9 of the "
                        f"engine → first reply {app['crash_to_reply_s']:.1f} s, runs {app['crash_runs_s']}, ÷ "
                        f"{app['warm_app_s']:.1f} s)", "≤ 1.2", verdict(app["crash_over_warm"] <= 1.2)))
        out.append(("no-op restart", f"**{app['restart_bytes']} bytes**, {app['restart_requests']} requests on each of "
                    f"{app['starts']} restarts (the first start fetched {app['first_start']['bytes'] / 1e6:.1f} MB)",
                    "0", verdict(app["restart_bytes"] == 0)))
    else:
        out.append(("app over HTTP", app["error"], "", "ERROR"))
    if "error" not in dm:
        out.append(("download", f"**{dm['download']:.1f}×** cp (`git lfs pull` {dm['lfs_pull_s']:.2f} s, cp "
                    f"{dm['cp_s']:.2f} s, {dm['lfs_bytes'] / 1e6:.0f} MB in {dm['files']} files); the app's whole "
                    f"download (clone, pull, verify, rename) {dm['app_download']:.1f}× cp", "report", "—"))
        out.append(("load memory", f"**{dm['load_memory']:.2f}** (peak {dm['peak_rss'] / MiB:.0f} MiB ÷ (weights "
                    f"{dm['weight_bytes'] / MiB:.0f} MiB + interpreter {dm['baseline_rss'] / MiB:.0f} MiB); runs "
                    f"{spread(dm['load_memory_ratios'])}; Engine.load alone peaks at "
                    f"{dm['load_only_peak_rss'] / MiB:.0f} MiB as the weights are mapped lazily)",
                    "≤ 1.3", verdict(dm["load_memory"] <= 1.3)))
    else:
        out.append(("download / load memory", dm["error"], "", "ERROR"))
    if "error" not in app:
        conc = app["concurrency"]
        parts = [f"limit {limit}: {c['tok_s']:.1f} tok/s (×{c['vs_first']:.2f})" for limit, c in conc.items()]
        errors = sum(len(c["errors"]) for c in conc.values())
        replies = sum(c["replies"] for c in conc.values())
        out.append(("concurrency", f"{app['clients']} clients: " + ", ".join(parts)
                    + f"; {errors} errors in {replies} replies", "report; no errors", verdict(errors == 0)))
    if "error" not in engine:
        out.append(("engine stream (no HTTP)", f"{engine['engine_stream']:.2f} (engine stream "
                    f"{engine['stream_tok_s']:.1f} ÷ plain generate {engine['plain_tok_s']:.1f} tok/s on the engine's "
                    "worker thread)", "≥ 0.97", verdict(engine["engine_stream"] >= 0.97)))
    if "error" not in loaders:
        out.append(("InternLM2 native ÷ remote-code: load time", f"{loaders['load_time']:.2f} "
                    f"({loaders['native_load_s']:.2f} s vs {loaders['remote_load_s']:.2f} s); load + first token "
                    f"{loaders['ready_time']:.2f} ({loaders['native_ready_s']:.2f} s vs "
                    f"{loaders['remote_ready_s']:.2f} s)",
                    "report", "—"))
        out.append(("InternLM2 native ÷ remote-code: peak RSS", f"{loaders['peak_rss_ratio']:.2f} while loading "
                    f"({loaders['native_peak_rss'] / MiB:.0f} vs {loaders['remote_peak_rss'] / MiB:.0f} MiB; above the "
                    f"interpreter: {loaders['native_peak_over_weights']:.2f}× vs "
                    f"{loaders['remote_peak_over_weights']:.2f}× the weights); "
                    f"{loaders['serving_peak_rss_ratio']:.2f} through the first tokens", "report", "—"))
        out.append(("InternLM2 native ÷ remote-code: greedy tokens/s", f"{loaders['tokens_per_s']:.2f} "
                    f"({loaders['native_tok_s']:.1f} vs {loaders['remote_tok_s']:.1f} tok/s; same greedy tokens: "
                    f"{loaders['greedy_tokens_agree']})", "report", "—"))
    else:
        out.append(("InternLM2 loaders", loaders["error"], "", "ERROR"))
    if int8 and "error" not in int8:
        tok = int8["tok_s"]
        out.append(("CPU int8 ÷ bf16 tokens/s", f"**{int8['int8_over_bf16']:.2f}** ({tok['int8']:.1f} vs "
                    f"{tok['bf16']:.1f} tok/s, 565M InternLM2 shape, {int8['backend']})", "≥ 2.0",
                    verdict(int8["int8_over_bf16"] >= 2.0)))
        out.append(("CPU int8 ÷ fp32 tokens/s", f"**{int8['int8_over_fp32']:.2f}** (fp32 {tok['fp32']:.1f} tok/s)",
                    "≥ 5.0", verdict(int8["int8_over_fp32"] >= 5.0)))
        out.append(("int8 bytes/s ÷ copy bandwidth", f"**{int8['bandwidth_ratio']:.2f}** ({int8['int8_achieved_gb_s']}"
                    f" GB/s of weights ÷ {int8['copy_gb_s']} GB/s copy)", "≥ 0.7",
                    verdict(int8["bandwidth_ratio"] >= 0.7)))
        out.append(("int8 load peak ÷ (int8 weights + one shard)", f"**{int8['load_peak_over_int8_plus_shard']:.2f}**"
                    f" (model in memory {int8.get('int8_model_mb')} MB incl. bf16 embeddings, shard "
                    f"{int8.get('shard_mb')} MB; over the int8 Linears alone "
                    f"{int8.get('load_peak_over_linears_plus_shard', float('nan')):.2f}; peaks MB: "
                    f"{int8['load_peak_mb']})", "≤ 1.3",
                    verdict(int8["load_peak_over_int8_plus_shard"] <= 1.3)))
    if engines and "error" not in engines:
        users, count = engines["users"], engines["users_count"]
        scaled = users[f"limit_{count}_over_limit_1"]
        out.append(("page ÷ server stream (engine=openai)", f"**{engines['stream_ratio']:.2f}** ("
                    f"{engines['page_tok_s']:.1f} vs {engines['direct_tok_s']:.1f} tok/s from `transformers serve`"
                    f" to the openai client, browser-like reader; runs {spread(engines['stream_ratios'])}; through"
                    f" gradio_client {engines.get('gradio_client_ratio', float('nan')):.2f})", "≥ 0.95",
                    verdict(engines["stream_ratio"] >= 0.95)))
        out.append(("first token over HTTP − the server's own", f"**{engines['first_token_delta_ms']:+.0f} ms** "
                    f"(page {engines['page_first_ms']:.0f} ms, server {engines['direct_first_ms']:.0f} ms)",
                    "≤ 50 ms", verdict(engines["first_token_delta_ms"] <= 50)))
        out.append((f"{count} users: continuous batching ÷ engine=transformers limit 1",
                    f"{users['cb_over_limit_1']:.2f} ({users['transformers_serve_cb']:.1f} vs "
                    f"{users['engine_transformers_limit_1']:.1f} tok/s; limit {count} ÷ limit 1: {scaled:.2f})",
                    "report", "—"))
    if adapter and "error" not in adapter:
        rows_ = adapter["summary"]
        cold, shared = rows_["adapter_cold"]["first_reply_s"], rows_["adapter_shared_base"]["first_reply_s"]
        out.append(("adapter deploy ÷ merged-model deploy: bytes",
                    f"**{adapter['bytes_ratio_cold']:.2f}** with the base to download, "
                    f"**{adapter['bytes_ratio_shared_base']:.3f}** with a shared base on disk (adapter "
                    f"{adapter['adapter_file_mb']} MB, merged weights {adapter['merged_weights_mb']} MB)", "report",
                    "—"))
        out.append(("adapter deploy ÷ merged-model deploy: first reply", f"{adapter['first_reply_ratio_cold']:.2f} "
                    f"cold, {adapter['first_reply_ratio_shared_base']:.2f} with a shared base ("
                    f"{cold:.1f} / {shared:.1f} vs {rows_['merged']['first_reply_s']:.1f} s)", "report", "—"))
    return out


def setup_text(app: dict, dm: dict, loaders: dict) -> list:
    lines = []
    if "error" not in app:
        lines.append(f"- App figures: the rendered template run as `python app.py` (CPU, DTYPE=float32), model "
                     f"{app['params'] / 1e6:.0f}M parameters (Llama, fp32, untrained, stop tokens made unreachable "
                     f"under greedy), pulled over loopback smart-HTTP + LFS from a bare repo; prompt of "
                     f"{app['prompt_tokens']} tokens, {app['tokens']} new tokens, greedy, {app['runs']} alternating "
                     f"runs; warm start and restart: {app['starts']} alternating starts; concurrency: "
                     f"{app['clients']} clients, bursts alternating between three servers. The HTTP reply equalled "
                     f"the plain generate's text in {app['same_text_as_plain']} runs (an untrained model's near-tied "
                     "logits let tiny numeric differences pick another token; the length is fixed either way).")
    if "error" not in dm:
        lines.append(f"- Download and load memory: a {dm['weight_bytes'] / 1e6:.0f} MB fp32 model (hidden 1024, 8 "
                     "layers, 100 MB shards) from a local file:// remote, warm page cache for both sides.")
    if "error" not in loaders:
        lines.append(f"- Loaders: tests/internlm2_fixture checkpoint, {loaders['weight_bytes'] / 1e6:.0f} MB fp32 "
                     f"(hidden 512, 8 layers), {loaders['runs']} fresh interpreters per loader, alternating, "
                     f"{loaders['tokens']} greedy tokens after a short prompt.")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer runs, to check that everything works")
    parser.add_argument("--table-only", action="store_true", help="rewrite results.md from the last run's JSON")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    started = clock()
    quick = args.quick
    parts = [("stream_efficiency.py", ["--tokens", "128", "--runs", "2" if quick else "5"], "engine"),
             ("app_bench.py", ["--tokens", "128", "--runs", "2" if quick else "7", "--starts", "1" if quick else "3"],
              "app"),
             ("download_memory.py", ["--runs", "1" if quick else "3"], "download_memory"),
             ("loaders.py", ["--runs", "1" if quick else "3", "--tokens", "32"], "loaders"),
             ("int8_cpu.py", ["--rounds", "1" if quick else "3"], "int8"),
             ("engines_bench.py", ["--runs", "2" if quick else "5"], "engines"),
             ("adapter_bench.py", ["--runs", "1" if quick else "2"], "adapter")]
    found = {}
    for script, part_args, name in parts:
        if args.table_only:
            path = OUT / f"{name}.json"
            found[name] = json.loads(path.read_text()) if path.exists() else {"error": f"no {path.name}"}
        else:
            found[name] = run_part(script, part_args, name)
    engine, app, dm, loaders, int8, engines, adapter = (found[name] for name in (
        "engine", "app", "download_memory", "loaders", "int8", "engines", "adapter"))
    table = ["| figure | measured | goal | result |", "|---|---|---|---|"]
    table += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows(app, dm, loaders, engine, int8, engines, adapter)]
    run = {"now": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "load": load_average(), "minutes": (clock() - started) / 60}
    if args.table_only and (OUT / "run.json").exists():
        run = json.loads((OUT / "run.json").read_text(encoding="utf-8"))
    else:
        (OUT / "run.json").write_text(json.dumps(run), encoding="utf-8")
    now, load = run["now"], run["load"]
    text = "\n".join([
        "# Benchmark results", "",
        f"Run {now} on {machine()}; load average at the end {' '.join(load)} (the machine is shared).",
        f"Command: `.venv/bin/python bench/run_all.py`{' --quick' if args.quick else ''}; "
        f"took {run['minutes']:.1f} min. What each figure means: bench/README.md.", "",
        *table, "", *setup_text(app, dm, loaders),
        "- Load average (1, 5, 15 min) after each part: " + "; ".join(
            f"{name} {found[name].get('load_average_after', '?')}" for name in found) + ".", "",
    ])
    (BENCH / "results.md").write_text(text, encoding="utf-8")
    print(text)


if __name__ == "__main__":
    main()
