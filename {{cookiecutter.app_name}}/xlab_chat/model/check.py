"""Check a model repo before anyone deploys it, without downloading the weights.

Standard library only. The template's post-generation hook, the app's pre-flight
check and ``python -m xlab_chat check [--hardware …]`` all use it.

The repo is listed with a shallow clone whose LFS files stay pointer files
(GIT_LFS_SKIP_SMUDGE), so sizes come from the pointers; every git step runs
under one overall time bound (``MODEL_CHECK_TIMEOUT`` seconds, at most 60) with
prompts disabled. The result is a checklist, one line per check:

    ✓ passed   ⚠ worth a look (generation goes on)   ✗ the app would fail (generation stops)

This module runs the checks in order and prints them; each concern has its own module:
``listing`` (the repo's files, without LFS content), ``files_check`` (config, tokenizer, chat
template, weights), ``lfs_check`` (the weights in LFS), ``fit_check`` (memory), ``adapter_check``
(a LoRA adapter and its base), ``engine_check`` (the engine, or engine=openai's server) and
``answers`` (the template's answers). ``report`` holds the Check and Report they all build.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Mapping, Optional, Sequence, Tuple

from .adapter_check import check_adapter_repo, is_adapter
from .answers import check_answers, is_yes
from .engine_check import check_endpoint_report, check_engine
from .files_check import check_chat_template, check_config, check_modelscope, check_tokenizer, check_weights
from .fit_check import check_fit
from .git_tools import RepoError, git_env
from .lfs_check import Remote, check_lfs
from .listing import Listing, list_remote, scan_folder
from .llava_check import check_llava_repo, is_llava_listing
from .llava_layout import default_visual_encoder
from .repo_url import LOCAL, MODELSCOPE, RepoURLError, normalise
from .report import (
    DEFAULT_TIMEOUT,
    FAIL,
    INFO,
    LATER,
    MAX_TIMEOUT,
    OK,
    SKIP,
    SYMBOLS,
    TIMEOUT_ENV,
    TOKEN_FIX,
    WARN,
    Check,
    Deadline,
    Report,
    check_timeout,
    output_symbols,
)
from .source import resolve_source, same_host

__all__ = [  # what the hooks, startup, __main__ and the tests import from here
    "DEFAULT_TIMEOUT", "MAX_TIMEOUT", "SYMBOLS", "Check", "Report", "check_answers", "check_endpoint_report",
    "check_repo", "check_settings", "check_timeout", "cli", "is_yes", "summary",
]


def _reach_failure(error: RepoError, token: str, repo: str) -> Tuple[Check, bool, bool]:
    """(check line, unreachable, needs token) for a listing that failed."""
    title = "1 reachable, revision exists"
    if error.kind == "network":
        return Check(title, WARN, f"not checked: {error.what}", LATER), True, False
    if error.kind == "auth" and not token:
        return Check(title, WARN, "the repo needs a login and MODEL_REPO_TOKEN is not set", TOKEN_FIX), False, True
    if error.kind == "auth":
        return Check(title, FAIL, "the repo refused MODEL_REPO_TOKEN (or MODEL_REPO_USER)",
                     "check the token is valid and can read this repo, and MODEL_REPO_USER"), False, False
    if error.kind == "missing-tool":
        return Check(title, WARN, f"not checked: {error.what}", error.fix), False, False
    if error.kind == "revision":
        return Check(title, FAIL, error.what, "answer model_revision with a branch, tag or commit that exists"
                     " (or set MODEL_REVISION)"), False, False
    return Check(title, FAIL, error.what, f"check model_repo ({repo}): {error.fix}"), False, False


def _local_path(repo: str) -> Optional[Path]:
    if repo.startswith("file://"):
        from urllib.parse import unquote, urlsplit

        return Path(unquote(urlsplit(repo).path))
    if "://" in repo:
        return None
    return Path(repo).expanduser()


def check_repo(repo: str, revision: str = "main", hardware: str = "auto", loader: str = "native",
               dtype: str = "auto", token: str = "", user: str = "", timeout: Optional[float] = None,
               hub: Optional[str] = None, platforms: str = "local", quantize: str = "auto",
               engine: str = "transformers", base_repo: str = "", base_revision: str = "main",
               visual_repo: str = "", visual_revision: str = "main") -> Report:
    """Run every check; never raises for a problem of the repo or the network.

    ``platforms`` is where the app will run: the answer's hosted platforms have the fit judged on their
    CPU tiers; "local" (the app's own pre-flight, on the machine it runs on) judges this machine.
    """
    deadline = Deadline(check_timeout() if timeout is None else min(timeout, MAX_TIMEOUT))
    report = Report(repo, revision or "main", hardware)
    report.base_repo, report.base_revision = base_repo, base_revision or "main"
    report.visual_repo, report.visual_revision = visual_repo, visual_revision or "main"
    if "://" not in repo and repo.strip() and Path(repo.strip()).expanduser().exists():
        repo = str(Path(repo.strip()).expanduser().resolve())  # a relative folder (MODEL_PATH=./merged)
    try:
        parsed = normalise(repo)
    except RepoURLError as error:
        report.checks.append(Check("1 reachable, revision exists", FAIL, error.what, error.fix))
        return _skip_rest(report)
    if parsed.changed:
        report.notes.append("  " + parsed.describe())
        if parsed.revision and revision in ("", "main"):
            report.revision = revision = parsed.revision
    hub = hub or parsed.hub
    title = "1 reachable, revision exists"
    local = _local_path(parsed.git_url) if parsed.hub == LOCAL else None
    if local is not None and not local.exists():
        report.checks.append(Check(title, FAIL, f"the folder {local} does not exist",
                                   "check model_repo: the folder must exist on the machine that runs the app"))
        return _skip_rest(report)
    work_parent = Path(tempfile.mkdtemp(prefix="model-check-"))
    try:
        try:
            source = resolve_source(parsed.git_url, revision or "main")
            remote = None
            if source.local_folder is not None:
                sizes, lfs = scan_folder(source.local_folder)
                listing = Listing(source.local_folder, sizes, lfs, local_folder=True)
                report.checks.append(Check(title, OK, f"local folder {source.local_folder}, used as it is"))
            else:
                env = git_env(token, user)
                env["GIT_HTTP_LOW_SPEED_TIME"] = str(max(1, min(30, int(deadline.seconds))))
                listing = list_remote(source.url, source.revision, work_parent / "repo", env, deadline, (token,))
                remote = Remote(source.url, token, user)
                report.checks.append(Check(title, OK, f"revision {source.revision} is commit {listing.commit[:12]}"))
        except RepoError as error:
            check, report.unreachable, report.needs_token = _reach_failure(error, token, repo)
            report.checks.append(check)
            return _skip_rest(report)
        _run_checks(report, listing, hub, hardware, loader, dtype, remote, deadline, platforms, quantize, engine)
    finally:
        shutil.rmtree(work_parent, ignore_errors=True)
    return report


def _run_checks(report: Report, listing: Listing, hub: str, hardware: str, loader: str, dtype: str,
                remote: Optional[Remote], deadline: Deadline, platforms: str, quantize: str,
                engine: str = "transformers") -> None:
    options = dict(hardware=hardware, loader=loader, dtype=dtype, platforms=platforms, quantize=quantize, engine=engine)
    if is_llava_listing(list(listing.sizes)):
        _run_llava_checks(report, listing, hub, remote, deadline, options)
        return
    if is_adapter(list(listing.sizes)):
        _run_adapter_checks(report, listing, remote, deadline, options)
        return
    config_check, config = check_config(listing, loader)
    report.config = config
    tokenizer_check, tok_config = check_tokenizer(listing, loader)
    weights_check, weights = check_weights(listing)
    report.checks += [
        config_check,
        tokenizer_check,
        check_chat_template(listing, tok_config, config),
        weights_check,
        check_lfs(listing, weights, remote, deadline),
        *check_fit(listing, weights, config, hardware, dtype, platforms, quantize),
    ]
    if hub == MODELSCOPE:
        report.checks.append(check_modelscope(listing))
    engine_check = check_engine(listing, config, engine, hardware)
    if engine_check is not None:
        report.checks.append(engine_check)


def _base_checker(remote: Optional[Remote], deadline: Deadline, options: dict):
    """check_repo for the base model an adapter or LLaVA folder needs; the token is for the first repo's host only."""
    def check_base(repo: str, revision: str) -> Report:
        shared = remote is not None and same_host(repo, remote.url)
        return check_repo(repo, revision, token=remote.token if shared else "", user=remote.user if shared else "",
                          timeout=max(1.0, deadline.end - time.monotonic()), **options)

    return check_base


def _run_adapter_checks(report: Report, listing: Listing, remote: Optional[Remote], deadline: Deadline,
                        options: dict) -> None:
    """A LoRA adapter repo: the adapter itself, then the base model it needs, checked as usual."""
    if options["engine"] not in ("transformers",):
        report.checks.append(Check(f"9 engine {options['engine']}", FAIL, "a LoRA adapter: the engine servers"
                                   " serve whole models only", "answer engine=transformers (it merges the adapter"
                                   " at load), or deploy the merged model (xtuner convert merge)"))

    report.checks += check_adapter_repo(listing, remote.url if remote else str(listing.root), report.base_repo,
                                        report.base_revision, _base_checker(remote, deadline, options), Check,
                                        {"ok": OK, "warn": WARN, "fail": FAIL, "info": INFO})
    adapter_files = [name for name in listing.lfs if name.startswith("adapter_model")]
    lfs = check_lfs(listing, adapter_files, remote, deadline)
    lfs.title = "6 adapter in LFS"
    report.checks.append(lfs)


def _run_llava_checks(report: Report, listing: Listing, hub: str, remote: Optional[Remote], deadline: Deadline,
                      options: dict) -> None:
    """An XTuner LLaVA folder: its parts, the base LLM checked as usual, and the CLIP tower's config."""
    if options["engine"] not in ("transformers",):
        report.checks.append(Check(f"9 engine {options['engine']}", FAIL, "an XTuner LLaVA folder: LMDeploy and vLLM"
                                   " do not load XTuner's LLaVA format", "answer engine=transformers (it runs the"
                                   " projector, CLIP and both adapters as xtuner chat does)"))

    def visual_config(repo: str, revision: str) -> Optional[dict]:
        try:
            source = resolve_source(repo, revision)
            if source.local_folder is not None:
                sizes, lfs = scan_folder(source.local_folder)
                return Listing(source.local_folder, sizes, lfs, local_folder=True).read_json("config.json")[0]
            shared = remote is not None and same_host(repo, remote.url)
            env = git_env(remote.token if shared else "", remote.user if shared else "")
            with tempfile.TemporaryDirectory(prefix="clip-check-") as work:
                listing = list_remote(source.url, source.revision, Path(work) / "repo", env, deadline,
                                      (remote.token,) if shared else ())
                return listing.read_json("config.json")[0]
        except (RepoError, RepoURLError, OSError):
            return None

    report.checks += check_llava_repo(listing, remote.url if remote else str(listing.root), report.base_repo,
                                      report.base_revision, report.visual_repo or default_visual_encoder(hub),
                                      report.visual_revision,
                                      _base_checker(remote, deadline, options), visual_config, Check,
                                      {"ok": OK, "warn": WARN, "fail": FAIL, "info": INFO})


def _skip_rest(report: Report) -> Report:
    for title in ("2 config.json and model type", "3 tokenizer", "4 chat template", "5 weights", "6 weights in LFS",
                  f"7 fits {report.hardware}"):
        report.checks.append(Check(title, SKIP, "not checked"))
    return report


def check_settings(settings: object, timeout: Optional[float] = None) -> Report:
    """The app's pre-flight check, from its Settings (MODEL_PATH wins over MODEL_REPO, as in the app)."""
    model_path = getattr(settings, "model_path", None)
    return check_repo(
        str(model_path) if model_path else getattr(settings, "model_repo", ""),
        getattr(settings, "model_revision", "main"),
        getattr(settings, "hardware", "auto"),
        getattr(settings, "loader", "native"),
        getattr(settings, "dtype", "auto"),
        token=getattr(settings, "repo_token", ""),
        user=getattr(settings, "repo_user", ""),
        timeout=timeout,
        quantize=getattr(settings, "quantize", "auto"),
        engine="command" if getattr(settings, "engine_command", "") else getattr(settings, "engine", "transformers"),
        base_repo=getattr(settings, "base_model_repo", ""),
        base_revision=getattr(settings, "base_model_revision", "main"),
        visual_repo=getattr(settings, "visual_encoder_repo", ""),
        visual_revision=getattr(settings, "visual_encoder_revision", "main"),
    )


def summary(report: Report) -> str:
    """What to do next, in one line, for the hook and the CLI."""
    if report.failed:
        return f"the model repo check found {len(report.failed)} problem(s) marked {output_symbols()[FAIL]}"
    if report.unreachable:
        return f"the model host could not be reached, so the repo was not checked — {LATER}"
    if report.needs_token:
        return "the model repo needs a login, so it was not checked — " + TOKEN_FIX
    if report.warnings:
        return f"the model repo passed with {len(report.warnings)} warning(s) marked {output_symbols()[WARN]}"
    return "the model repo passed every check"


def _defaults() -> dict:
    from ..settings import SettingsError, load_defaults

    try:
        return load_defaults()
    except SettingsError:
        return {}


def cli(argv: Sequence[str], env: Optional[Mapping[str, str]] = None) -> int:
    """``python -m xlab_chat check [--repo …] [--revision …] [--hardware …] [--loader …]``; 1 on any ✗."""
    from ..settings import DTYPE_CHOICES, ENGINE_CHOICES, HARDWARE_CHOICES, LOADER_CHOICES, QUANTIZE_CHOICES

    env = os.environ if env is None else env
    argv = list(argv)
    if argv and argv[0] == "check":
        argv = argv[1:]
    elif argv and not argv[0].startswith("-"):
        print(f"ERROR: unknown command {argv[0]!r} — use `python -m xlab_chat check [--hardware …]`", file=sys.stderr)
        return 2
    defaults = _defaults()

    def pick(name: str, fallback: str) -> str:
        return (env.get(name.upper()) or str(defaults.get(name) or "") or fallback).strip()

    parser = argparse.ArgumentParser(
        prog="python -m xlab_chat check",
        description="Check the model repo without downloading its weights (MODEL_REPO_TOKEN and MODEL_REPO_USER"
                    " are read from the environment).",
    )
    parser.add_argument("--repo", default=env.get("MODEL_PATH") or pick("model_repo", ""),
                        help="git URL, model page or folder (default: MODEL_PATH, MODEL_REPO or settings.json)")
    parser.add_argument("--revision", default=pick("model_revision", "main"), help="branch, tag or commit")
    parser.add_argument("--hardware", default=pick("hardware", "auto").lower(), choices=HARDWARE_CHOICES)
    parser.add_argument("--loader", default=pick("loader", "native").lower(), choices=LOADER_CHOICES)
    parser.add_argument("--dtype", default=(env.get("DTYPE") or "auto").lower(), choices=DTYPE_CHOICES)
    parser.add_argument("--quantize", default=pick("quantize", "auto").lower(), choices=QUANTIZE_CHOICES)
    parser.add_argument("--base-repo", default=pick("base_model_repo", ""),
                        help="the base model, when the repo holds a LoRA adapter (default: BASE_MODEL_REPO)")
    parser.add_argument("--base-revision", default=pick("base_model_revision", "main"))
    parser.add_argument("--visual-encoder-repo", default=pick("visual_encoder_repo", ""),
                        help="the CLIP tower of an XTuner LLaVA folder (default: VISUAL_ENCODER_REPO, else"
                             " clip-vit-large-patch14-336 on the model's hub)")
    parser.add_argument("--visual-encoder-revision", default=pick("visual_encoder_revision", "main"))
    parser.add_argument("--engine", default=pick("engine", "transformers").lower(), choices=ENGINE_CHOICES,
                        help="engine=openai checks ENGINE_URL / ENGINE_MODEL (key from ENGINE_API_KEY) instead")
    parser.add_argument("--platforms", default=pick("platforms", "local").lower(),
                        help="where the app will run, as answered (all, local, or names joined by +): the CPU"
                             " fit is judged on those platforms' tiers")
    parser.add_argument("--timeout", type=float, default=None,
                        help=f"seconds for the whole check (default {TIMEOUT_ENV} or {DEFAULT_TIMEOUT:.0f}, at most"
                             f" {MAX_TIMEOUT:.0f})")
    args = parser.parse_args(argv)
    if args.engine == "openai":
        report = check_endpoint_report(pick("engine_url", ""), pick("engine_model", ""), env.get("ENGINE_API_KEY", ""),
                                       args.timeout)
        return _finish(report)
    if not args.repo:
        print("ERROR: no model repo to check — pass --repo or set MODEL_REPO", file=sys.stderr)
        return 2
    report = check_repo(args.repo, args.revision, args.hardware, args.loader, args.dtype,
                        token=env.get("MODEL_REPO_TOKEN", ""), user=env.get("MODEL_REPO_USER", ""),
                        timeout=args.timeout, platforms=args.platforms, quantize=args.quantize, engine=args.engine,
                        base_repo=args.base_repo, base_revision=args.base_revision,
                        visual_repo=args.visual_encoder_repo, visual_revision=args.visual_encoder_revision)
    return _finish(report)


def _finish(report: Report) -> int:
    print(report.render(), flush=True)
    line = summary(report)
    if report.failed:
        print(f"ERROR: {line} — fix them and run the check again", file=sys.stderr, flush=True)
        return 1
    print(line, flush=True)
    return 0
