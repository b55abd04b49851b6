"""Check the template's answers before a file is written (both hooks use this)."""

from __future__ import annotations

import re
from typing import List, Mapping, Tuple

from .engine_check import GPU_ENGINES
from .llamacpp_check import answer_problems as llamacpp_answer_problems
from .repo_url import RepoURLError, normalise

SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
BAD_REVISION = re.compile(r"(^[-/.])|[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{|//|/$|\.lock$|\.$")
TRUE_WORDS = ("1", "true", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "no", "n", "off")
NUMBER_ANSWERS = (("max_new_tokens", int), ("temperature", float), ("top_p", float), ("repetition_penalty", float))


def suggest_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    return slug[:64].strip("-") or "my-chat-app"


def is_yes(flag: object) -> bool:
    return flag if isinstance(flag, bool) else str(flag).strip().lower() in TRUE_WORDS


def check_answers(answers: Mapping[str, object]) -> List[Tuple[str, str]]:
    """Every problem with the template's answers as (what, fix); an empty list means they are good."""
    from ..settings import (
        ENGINE_CHOICES,
        HARDWARE_CHOICES,
        LOADER_CHOICES,
        QUANTIZE_CHOICES,
        SettingsError,
        check_number,
    )

    problems = []
    name = str(answers.get("app_name", ""))
    if not SLUG.match(name) or len(name) > 64:
        problems.append((f"app_name {name!r} is not a slug",
                         f"use lower-case letters, digits and single dashes, at most 64 characters, e.g. "
                         f"{suggest_slug(name)}"))
    for key, kind in NUMBER_ANSWERS:
        try:
            check_number(key.upper(), answers.get(key), kind)
        except SettingsError as error:
            what, _, fix = str(error).partition(" — ")
            problems.append((key + what[len(key):], fix))
    for key, choices in (("hardware", HARDWARE_CHOICES), ("loader", LOADER_CHOICES),
                         ("quantize", QUANTIZE_CHOICES), ("engine", ENGINE_CHOICES)):
        value = answers.get(key)
        if value not in choices:
            problems.append((f"{key} {value!r} is not known", f"answer one of: {', '.join(choices)}"))
    if answers.get("engine") == "openai" and not (str(answers.get("engine_url", "")).strip()
                                                  and str(answers.get("engine_model", "")).strip()):
        problems.append(("engine=openai needs engine_url and engine_model",
                         "answer the server's address (e.g. http://10.0.0.5:23333/v1) and the model name it serves"))
    if answers.get("engine") in GPU_ENGINES and answers.get("hardware") == "cpu":
        problems.append((f"engine={answers.get('engine')} needs an NVIDIA GPU but hardware is cpu",
                         "answer hardware a10-24gb or a100-40gb, or engine=transformers for the CPU"))
    problems += llamacpp_answer_problems(answers)
    flag = answers.get("validate_model_repo")
    if not isinstance(flag, bool) and str(flag).strip().lower() not in TRUE_WORDS + FALSE_WORDS:
        problems.append((f"validate_model_repo {flag!r} is not yes or no", "answer yes (check the repo now) or no"))
    if answers.get("engine") != "openai":  # the openai engine's server holds the model: no repo to check
        problems += _model_repo_problems(answers)
    return problems


def _model_repo_problems(answers: Mapping[str, object]) -> List[Tuple[str, str]]:
    problems = []
    revision = str(answers.get("model_revision", "")).strip()
    if not revision:
        problems.append(("model_revision is empty", "answer main, or a branch, tag or commit of the model repo"))
    elif BAD_REVISION.search(revision):
        problems.append((f"model_revision {revision!r} is not a branch, tag or commit name",
                         "answer main, or a branch, tag or commit as git shows it (no spaces, no leading '-')"))
    try:
        implied = normalise(str(answers.get("model_repo", ""))).revision
    except RepoURLError as error:
        problems.append((error.what, error.fix))
    else:
        if implied and revision not in ("", "main", implied):
            problems.append((f"model_repo points at revision {implied} but model_revision is {revision}",
                             f"answer model_revision {implied}, or paste the repo address without /tree/{implied}"))
    return problems


def unused_answers(answers: Mapping[str, object]) -> str:
    """One line naming the answers the chosen engine ignores (given, yet not used), or ""."""
    engine = answers.get("engine")
    if engine == "openai":
        unused = [key for key in ("model_repo", "base_model_repo") if str(answers.get(key, "")).strip()]
        unused += [key for key, default in (("loader", "native"), ("quantize", "auto"))
                   if answers.get(key) != default]
        why = "the model runs on the server at engine_url"
    else:
        unused = [key for key in ("engine_url", "engine_model") if str(answers.get(key, "")).strip()]
        why = "only engine=openai uses them"
    if not unused:
        return ""
    return f"Note: engine={engine} ignores {', '.join(unused)} ({why})."
