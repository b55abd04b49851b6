"""Check every answer before a single file is written.

Standard library only. The answers arrive as JSON data (``| tojson``), never pasted
inside Python quotes, so no answer can change this code. Each problem prints
``ERROR: <what> — <how to fix>``; any problem exits 1 (and cookiecutter removes
the half-made folder).
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

ANSWERS = json.loads(r'''{
  "app_name": {{ cookiecutter.app_name | tojson }},
  "app_title": {{ cookiecutter.app_title | tojson }},
  "model_repo": {{ cookiecutter.model_repo | tojson }},
  "model_revision": {{ cookiecutter.model_revision | tojson }},
  "hardware": {{ cookiecutter.hardware | tojson }},
  "loader": {{ cookiecutter.loader | tojson }},
  "max_new_tokens": {{ cookiecutter.max_new_tokens | tojson }},
  "temperature": {{ cookiecutter.temperature | tojson }},
  "top_p": {{ cookiecutter.top_p | tojson }},
  "repetition_penalty": {{ cookiecutter.repetition_penalty | tojson }},
  "validate_model_repo": {{ cookiecutter.validate_model_repo | tojson }},
  "_repo_dir": {{ cookiecutter._repo_dir | tojson }}
}''')
# {% raw %}
# The app's own modules (repo_url, settings) are shared with this hook: standard library only, Jinja-free.
APP_FOLDER = "{{cookiecutter.app_name}}"  # the template's app folder, named literally (this block is not rendered)
SLUG = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
BAD_REVISION = re.compile(r"(^[-/.])|[\s~^:?*\[\\\x00-\x1f\x7f]|\.\.|@\{|//|/$|\.lock$|\.$")
TRUE_WORDS = ("1", "true", "yes", "y", "on")
FALSE_WORDS = ("0", "false", "no", "n", "off")
NUMBERS = (("max_new_tokens", int), ("temperature", float), ("top_p", float), ("repetition_penalty", float))


def suggest_slug(name: str) -> str:
    slug = re.sub(r"[^a-z0-9]+", "-", str(name).lower()).strip("-")
    return slug[:64].strip("-") or "my-chat-app"


def import_app_modules() -> tuple:
    """repo_url and settings from the template's app folder (no .pyc is left behind in the template)."""
    sys.dont_write_bytecode = True
    folder = Path(str(ANSWERS.get("_repo_dir") or ".")).resolve() / APP_FOLDER
    sys.path.insert(0, str(folder))
    try:
        import repo_url
        import settings
    except ImportError as error:
        print(f"ERROR: the template is incomplete ({error}; looked in {folder}) — download the template again",
              file=sys.stderr)
        raise SystemExit(1) from None
    return repo_url, settings


def check_answers(answers: dict, repo_url: object, settings: object) -> list:
    """Every problem as (what, fix); an empty list means the answers are good."""
    problems = []
    name = str(answers.get("app_name", ""))
    if not SLUG.match(name) or len(name) > 64:
        problems.append((f"app_name {name!r} is not a slug",
                         f"use lower-case letters, digits and single dashes, at most 64 characters, e.g. "
                         f"{suggest_slug(name)}"))
    for key, kind in NUMBERS:
        try:
            settings.check_number(key.upper(), answers.get(key), kind)
        except settings.SettingsError as error:
            what, _, fix = str(error).partition(" — ")
            problems.append((key + what[len(key):], fix))
    for key, choices in (("hardware", settings.HARDWARE_CHOICES), ("loader", settings.LOADER_CHOICES)):
        value = answers.get(key)
        if value not in choices:
            problems.append((f"{key} {value!r} is not known", f"answer one of: {', '.join(choices)}"))
    flag = answers.get("validate_model_repo")
    if not isinstance(flag, bool) and str(flag).strip().lower() not in TRUE_WORDS + FALSE_WORDS:
        problems.append((f"validate_model_repo {flag!r} is not yes or no", "answer yes (check the repo now) or no"))
    revision = str(answers.get("model_revision", "")).strip()
    if not revision:
        problems.append(("model_revision is empty", "answer main, or a branch, tag or commit of the model repo"))
    elif BAD_REVISION.search(revision):
        problems.append((f"model_revision {revision!r} is not a branch, tag or commit name",
                         "answer main, or a branch, tag or commit as git shows it (no spaces, no leading '-')"))
    try:
        parsed = repo_url.normalise(answers.get("model_repo", ""))
    except repo_url.RepoURLError as error:
        problems.append((error.what, error.fix))
    else:
        implied = parsed.revision
        if implied and revision not in ("", "main", implied):
            problems.append((f"model_repo points at revision {implied} but model_revision is {revision}",
                             f"answer model_revision {implied}, or paste the repo address without /tree/{implied}"))
        elif parsed.changed:
            print(parsed.describe() + " (defaults.json will say so)")
    return problems


def main() -> int:
    repo_url, settings = import_app_modules()
    problems = check_answers(ANSWERS, repo_url, settings)
    for what, fix in problems:
        print(f"ERROR: {what} — {fix}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
# {% endraw %}
