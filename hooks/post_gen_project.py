"""After the files are written: record the normalised model repo, then check the repo.

Standard library only; runs in the generated folder and uses the app's own
xlab_chat.model package (the same check as ``python -m xlab_chat check``).
Answers arrive as JSON data (``| tojson``), never pasted inside Python quotes.

Exit policy: any ✗ exits 1 (cookiecutter then removes the folder unless
--keep-project-on-failure); an unreachable host or a missing token is only a
warning, so generating works offline.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

ANSWERS = json.loads(r'''{
  "app_name": {{ cookiecutter.app_name | tojson }},
  "app_title": {{ cookiecutter.app_title | tojson }},
  "model_repo": {{ cookiecutter.model_repo | tojson }},
  "model_revision": {{ cookiecutter.model_revision | tojson }},
  "base_model_repo": {{ cookiecutter.base_model_repo | tojson }},
  "base_model_revision": {{ cookiecutter.base_model_revision | tojson }},
  "visual_encoder_repo": {{ cookiecutter.visual_encoder_repo | tojson }},
  "visual_encoder_revision": {{ cookiecutter.visual_encoder_revision | tojson }},
  "hardware": {{ cookiecutter.hardware | tojson }},
  "loader": {{ cookiecutter.loader | tojson }},
  "quantize": {{ cookiecutter.quantize | tojson }},
  "engine": {{ cookiecutter.engine | tojson }},
  "engine_url": {{ cookiecutter.engine_url | tojson }},
  "engine_model": {{ cookiecutter.engine_model | tojson }},
  "platforms": {{ cookiecutter.platforms | tojson }},
  "max_new_tokens": {{ cookiecutter.max_new_tokens | tojson }},
  "temperature": {{ cookiecutter.temperature | tojson }},
  "top_p": {{ cookiecutter.top_p | tojson }},
  "repetition_penalty": {{ cookiecutter.repetition_penalty | tojson }},
  "validate_model_repo": {{ cookiecutter.validate_model_repo | tojson }}
}''')
# {% raw %}
def write_json_atomically(path: Path, data: dict) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(partial, path)


def write_readable_settings(folder: Path, changes: dict) -> None:
    """settings.json as a person reads it: real characters, not the \\uXXXX escapes Jinja's tojson writes, the
    example prompts as a JSON list (the answer is one |-joined line), and the values the hook normalised."""
    from xlab_chat.settings import prompt_list  # the app's own reading of the answer

    path = folder / "settings.json"
    settings = json.loads(path.read_text(encoding="utf-8"))
    settings["example_prompts"] = list(prompt_list(settings.get("example_prompts", "")))
    settings.update(changes)
    write_json_atomically(path, settings)


def record_normalised(folder: Path, repo: str, revision: str, new_repo: str, new_revision: str) -> None:
    """The README's mentions and ms_deploy.json get the git URL and revision the app will use."""
    readme = folder / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8")
        text = text.replace(f"`{repo}`", f"`{new_repo}`")
        text = text.replace(f"(revision `{revision}`)", f"(revision `{new_revision}`)")
        text = text.replace(f"（revision `{revision}`）", f"（revision `{new_revision}`）")  # the Chinese README
        text = text.replace(f"| `MODEL_REVISION` | `{revision}` |", f"| `MODEL_REVISION` | `{new_revision}` |")
        partial = readme.with_name(readme.name + ".tmp")
        partial.write_text(text, encoding="utf-8")
        os.replace(partial, readme)
    deploy_path = folder / "ms_deploy.json"  # rendered only for ModelScope
    if deploy_path.is_file():
        deploy = json.loads(deploy_path.read_text(encoding="utf-8"))
        for variable in deploy.get("environment_variables", []):
            if variable.get("name") == "MODEL_REPO":
                variable["value"] = new_repo
            elif variable.get("name") == "MODEL_REVISION":
                variable["value"] = new_revision
        write_json_atomically(deploy_path, deploy)


def remove_empty_folders(folder: Path, names: tuple = (".github",)) -> None:
    """A conditional file name that rendered empty leaves its folders behind (.github/workflows without CI)."""
    for name in names:
        for path in sorted((folder / name).glob("**/"), key=lambda p: len(p.parts), reverse=True):
            if path.is_dir() and not any(path.iterdir()):
                path.rmdir()


def normalise_model_repo(folder: Path) -> dict:
    """The model repo as the app will fetch it (a model page becomes its git URL, /tree/REV the revision):
    the changed settings, also written into the README and ms_deploy.json."""
    from xlab_chat.model.repo_url import normalise

    repo, revision = str(ANSWERS["model_repo"]).strip(), str(ANSWERS["model_revision"]).strip() or "main"
    parsed = normalise(repo)
    new_revision = parsed.revision if parsed.revision and revision in ("", "main") else revision
    if parsed.git_url == repo and new_revision == revision:
        return {"model_repo": repo, "model_revision": revision}
    record_normalised(folder, repo, revision, parsed.git_url, new_revision)
    print(f"{parsed.describe()}; settings.json now says model_repo={parsed.git_url}, model_revision={new_revision}")
    return {"model_repo": parsed.git_url, "model_revision": new_revision}


def main() -> int:
    folder = Path.cwd()
    remove_empty_folders(folder)
    sys.dont_write_bytecode = True  # no __pycache__ in the generated app
    sys.path.insert(0, str(folder))
    from xlab_chat.model import check as repo_check
    from xlab_chat.model.answers import unused_answers

    problems = repo_check.check_answers(ANSWERS)  # as the pre-gen hook did, in case it could not
    for what, fix in problems:
        print(f"ERROR: {what} — {fix}", file=sys.stderr)
    if problems:
        return 1
    note = unused_answers(ANSWERS)
    if note:
        print(note)
    repo = {} if ANSWERS["engine"] == "openai" else normalise_model_repo(folder)  # openai: no repo to fetch
    write_readable_settings(folder, repo)
    where = f"in {folder}"
    if not repo_check.is_yes(ANSWERS["validate_model_repo"]):
        print(f"The model repo was not checked (validate_model_repo=no) — run `python -m xlab_chat check` {where}"
              " before deploying.")
        return 0
    try:
        if ANSWERS["engine"] == "openai":
            print("Checking the engine server (engine=openai: the model runs there)…", flush=True)
            report = repo_check.check_endpoint_report(ANSWERS["engine_url"], ANSWERS["engine_model"],
                                                      os.environ.get("ENGINE_API_KEY", ""))
        else:
            print("Checking the model repo (no weights are downloaded)…", flush=True)
            report = repo_check.check_repo(repo["model_repo"], repo["model_revision"], ANSWERS["hardware"],
                                           ANSWERS["loader"], token=os.environ.get("MODEL_REPO_TOKEN", ""),
                                           user=os.environ.get("MODEL_REPO_USER", ""),
                                           platforms=ANSWERS["platforms"], quantize=ANSWERS["quantize"],
                                           engine=ANSWERS["engine"], base_repo=ANSWERS["base_model_repo"],
                                           base_revision=ANSWERS["base_model_revision"],
                                           visual_repo=ANSWERS["visual_encoder_repo"],
                                           visual_revision=ANSWERS["visual_encoder_revision"])
    except Exception as error:  # a bug in the check must not block generating the app
        print(f"WARNING: the model repo check could not run ({type(error).__name__}: {error}) — run"
              f" `python -m xlab_chat check` {where} later", file=sys.stderr)
        return 0
    print(report.render(), flush=True)
    if report.failed:
        print(f"ERROR: {repo_check.summary(report)} — fix the model repo (or the answers) and generate again; to keep"
              " the generated files anyway, add --keep-project-on-failure to the cookiecutter command, or answer"
              " validate_model_repo=no and run `python -m xlab_chat check` later", file=sys.stderr, flush=True)
        return 1
    line = repo_check.summary(report)
    print(f"WARNING: {line}" if report.unreachable or report.needs_token else line, flush=True)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("ERROR: interrupted — generate again, or answer validate_model_repo=no to skip the check",
              file=sys.stderr)
        sys.exit(130)
# {% endraw %}
