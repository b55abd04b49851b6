"""Check every answer before a single file is written.

Standard library only. The answers arrive as JSON data (``| tojson``), never pasted
inside Python quotes, so no answer can change this code. Each problem prints
``ERROR: <what> — <how to fix>``; any problem exits 1 (and cookiecutter removes
the half-made folder). The rules live in the app's xlab_chat.model.check.check_answers, which
the post-generation hook runs again (the only check where this hook cannot find
the template's folder).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

ANSWERS = json.loads(r'''{
  "app_name": {{ cookiecutter.app_name | tojson }},
  "app_title": {{ cookiecutter.app_title | tojson }},
  "model_repo": {{ cookiecutter.model_repo | tojson }},
  "model_revision": {{ cookiecutter.model_revision | tojson }},
  "base_model_repo": {{ cookiecutter.base_model_repo | tojson }},
  "base_model_revision": {{ cookiecutter.base_model_revision | tojson }},
  "hardware": {{ cookiecutter.hardware | tojson }},
  "loader": {{ cookiecutter.loader | tojson }},
  "quantize": {{ cookiecutter.quantize | tojson }},
  "engine": {{ cookiecutter.engine | tojson }},
  "engine_url": {{ cookiecutter.engine_url | tojson }},
  "engine_model": {{ cookiecutter.engine_model | tojson }},
  "max_new_tokens": {{ cookiecutter.max_new_tokens | tojson }},
  "temperature": {{ cookiecutter.temperature | tojson }},
  "top_p": {{ cookiecutter.top_p | tojson }},
  "repetition_penalty": {{ cookiecutter.repetition_penalty | tojson }},
  "validate_model_repo": {{ cookiecutter.validate_model_repo | tojson }},
  "_repo_dir": {{ cookiecutter.get("_repo_dir", "") | tojson }}
}''')
# {% raw %}
APP_FOLDER = "{{cookiecutter.app_name}}"  # the template's app folder, named literally (this block is not rendered)


def template_app_folder() -> Optional[Path]:
    """The template's app folder, whose stdlib-only xlab_chat package (model.check, settings) this hook shares.

    cookiecutter passes _repo_dir as it was typed (``cookiecutter .`` gives "."), and runs this hook in the
    new project folder while cookiecutter itself works in the template folder.
    """
    repo_dir = Path(str(ANSWERS.get("_repo_dir") or "."))
    candidates = [repo_dir] if repo_dir.is_absolute() else []
    candidates.append(Path(f"/proc/{os.getppid()}/cwd"))  # Linux: where cookiecutter runs, the template folder
    if not repo_dir.is_absolute() and os.environ.get("PWD"):
        candidates.append(Path(os.environ["PWD"]) / repo_dir)  # the shell's folder when cookiecutter started
    for candidate in candidates:
        try:
            folder = candidate.resolve() / APP_FOLDER
            if (folder / "xlab_chat" / "model" / "check.py").is_file():
                return folder
        except OSError:
            continue
    return None


def main() -> int:
    folder = template_app_folder()
    if folder is None:  # the post-generation hook checks the same answers with the generated copy of the code
        return 0
    sys.dont_write_bytecode = True  # leave no __pycache__ in the template (it would be copied into apps)
    sys.path.insert(0, str(folder))
    from xlab_chat.model.check import check_answers

    problems = check_answers(ANSWERS)
    for what, fix in problems:
        print(f"ERROR: {what} — {fix}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
# {% endraw %}
