"""Every knob of the app in one place.

The template's answers (``settings.json`` beside app.py) are the defaults; each one
can be overridden by one environment variable, so a platform's settings page is
enough to retune a deployed app without a new commit.
"""

from __future__ import annotations

import json
import os
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Tuple

APP_FOLDER = Path(__file__).resolve().parent.parent  # where app.py and settings.json are
SETTINGS_FILE = APP_FOLDER / "settings.json"
BOOT_TEST_ENV = "XLAB_BOOT_TEST"  # set by `python -m xlab_chat boot-test`: serve the page once, load no model

HARDWARE_CHOICES = ("auto", "a10-24gb", "a100-40gb", "cpu")
DTYPE_CHOICES = ("auto", "bfloat16", "float16", "float32")
LOADER_CHOICES = ("native", "remote-code")
QUANTIZE_CHOICES = ("auto", "none", "int8")
ENGINE_CHOICES = ("transformers", "lmdeploy", "vllm", "llamacpp", "openai")
# Replies streamed at once. A server engine batches dozens of streams on one GPU (continuous batching; vLLM
# and LMDeploy batch up to 256 by default); the app's own engine runs one generate() per reply, unbatched, and
# llama-cpp-python's server answers one request at a time, so there the page's line shows each user their place.
DEFAULT_CONCURRENCY = {"transformers": 1, "lmdeploy": 64, "vllm": 64, "llamacpp": 1, "openai": 64}
LANGUAGE_CHOICES = ("zh", "en")

# (lowest, highest) accepted for each numeric setting.
RANGES = {
    "MAX_NEW_TOKENS": (1, 32768),
    "TEMPERATURE": (0.0, 2.0),
    "TOP_P": (0.01, 1.0),
    "REPETITION_PENALTY": (1.0, 2.0),
    "CONCURRENCY_LIMIT": (1, 256),
    "QUEUE_SIZE": (0, 2048),
    "GRADIO_SERVER_PORT": (1, 65535),
    "ENGINE_TIMEOUT": (1.0, 3600.0),
    "ENGINE_START_TIMEOUT": (10.0, 7200.0),
}


class SettingsError(ValueError):
    """A setting has a value the app cannot use; the message names the variable and the fix."""


@dataclass(frozen=True)
class Settings:
    app_title: str
    description: str
    ui_language: str
    example_prompts: Tuple[str, ...]
    model_repo: str
    model_revision: str
    model_dir: Path
    model_path: Optional[Path]
    hardware: str
    loader: str
    dtype: str
    quantize: str
    system_prompt: str
    max_new_tokens: int
    temperature: float
    top_p: float
    repetition_penalty: float
    concurrency_limit: int
    queue_size: int  # users who may wait for a free slot; one more is told the queue is full
    server_name: str
    server_port: int
    keep_lfs_cache: bool
    base_model_repo: str = ""  # used when model_repo holds a LoRA adapter
    base_model_revision: str = "main"
    base_model_dir: Optional[Path] = None
    visual_encoder_repo: str = ""  # an XTuner LLaVA model's CLIP tower; "" picks CLIP-ViT-L/14-336 on the model's hub
    visual_encoder_revision: str = "main"
    visual_encoder_dir: Optional[Path] = None
    engine: str = "transformers"
    engine_url: str = ""
    engine_model: str = ""
    engine_args: str = ""
    engine_command: str = ""
    engine_timeout: float = 60.0
    engine_start_timeout: float = 900.0
    # Kept out of repr() so a logged Settings never shows a secret.
    repo_token: str = field(default="", repr=False)
    repo_user: str = ""
    engine_api_key: str = field(default="", repr=False)


def load_defaults(path: Path = SETTINGS_FILE) -> dict:
    """The template's answers, as rendered into settings.json."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except FileNotFoundError:
        raise SettingsError(f"{path.name} is missing — restore it from the template (or git) beside app.py") from None
    except ValueError as error:
        raise SettingsError(f"{path.name} is not valid JSON ({error}) — fix that line, or restore the file") from None
    if not isinstance(data, dict):
        raise SettingsError(f"{path.name} does not hold a JSON object — restore it from the template (or git)")
    return data


def prompt_list(value: object) -> Tuple[str, ...]:
    """Example prompts from a JSON list (settings.json) or a ``|``-joined string (EXAMPLE_PROMPTS, and the
    settings.json of apps rendered before the list)."""
    items = value if isinstance(value, (list, tuple)) else str(value or "").split("|")
    return tuple(str(item).strip() for item in items if str(item).strip())


def check_number(name: str, text: object, kind: Callable) -> object:
    """Parse one numeric setting and check its range; shared with the template's pre-gen hook."""
    low, high = RANGES[name]
    try:
        value = kind(str(text).strip())
    except ValueError:
        noun = "a whole number" if kind is int else "a number"
        raise SettingsError(f"{name}={text!r} is not {noun} — use {noun} from {low} to {high}") from None
    if not low <= value <= high:
        raise SettingsError(f"{name}={text} is out of range — use a value from {low} to {high}")
    return value


def _number(env: Mapping[str, str], name: str, default: object, kind: Callable) -> object:
    raw = env.get(name)
    return check_number(name, default if raw is None or not raw.strip() else raw, kind)


def _choice(env: Mapping[str, str], name: str, default: str, choices: Tuple[str, ...]) -> str:
    value = (env.get(name.upper()) or default).strip().lower()
    if value not in choices:
        raise SettingsError(f"{name.upper()}={value!r} is not known — use one of: {', '.join(choices)}")
    return value


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _command_line(env: Mapping[str, str], name: str) -> str:
    """ENGINE_ARGS / ENGINE_COMMAND, refused here if the shell-style quoting cannot be read."""
    value = env.get(name, "").strip()
    try:
        shlex.split(value)
    except ValueError as error:
        raise SettingsError(f"{name} cannot be read ({error}) — check its quotes: each opening quote needs its"
                            " closing one") from None
    return value


def default_queue_size(concurrency: int) -> int:
    """Room for four rounds of replies plus a few: a class arriving at once waits instead of being turned away."""
    return 4 * concurrency + 16


def _default_server_name(env: Mapping[str, str]) -> str:
    """Loopback on a laptop; all interfaces where a hosting platform routes traffic in."""
    on_platform = any(key in env for key in ("SPACE_ID", "MODELSCOPE_ENVIRONMENT", "OPENXLAB_APP_ID"))
    on_platform = on_platform or Path.cwd() == Path("/home/xlab-app-center")
    return "0.0.0.0" if on_platform else "127.0.0.1"


def load_settings(env: Optional[Mapping[str, str]] = None, defaults: Optional[dict] = None) -> Settings:
    """Read the settings, raising SettingsError with one clear line for a bad value."""
    env = os.environ if env is None else env
    defaults = load_defaults() if defaults is None else defaults

    def text(name: str) -> str:
        value = env.get(name.upper())
        return defaults.get(name, "") if value is None else value

    model_path = env.get("MODEL_PATH", "").strip()
    model_repo = text("model_repo").strip()
    engine = _choice(env, "engine", defaults.get("engine", "transformers"), ENGINE_CHOICES)
    if engine == "openai" and not (text("engine_url").strip() and text("engine_model").strip()):
        raise SettingsError("ENGINE=openai needs ENGINE_URL and ENGINE_MODEL — set them to the server's address"
                            " (e.g. http://10.0.0.5:23333/v1) and the model name its /v1/models lists")
    if not model_repo and not model_path and engine != "openai":
        raise SettingsError("MODEL_REPO is empty — set MODEL_REPO to the model's git URL or MODEL_PATH to a folder")
    concurrency = _number(env, "CONCURRENCY_LIMIT", DEFAULT_CONCURRENCY[engine], int)
    return Settings(
        app_title=text("app_title"),
        description=text("description"),
        ui_language=_choice(env, "ui_language", defaults.get("ui_language", "zh"), LANGUAGE_CHOICES),
        example_prompts=prompt_list(env.get("EXAMPLE_PROMPTS", defaults.get("example_prompts", ""))),
        model_repo=model_repo,
        model_revision=text("model_revision").strip() or "main",
        model_dir=Path(env.get("MODEL_DIR") or APP_FOLDER / "model").expanduser().resolve(),
        model_path=Path(model_path).expanduser().resolve() if model_path else None,
        hardware=_choice(env, "hardware", defaults.get("hardware", "auto"), HARDWARE_CHOICES),
        loader=_choice(env, "loader", defaults.get("loader", "native"), LOADER_CHOICES),
        dtype=_choice(env, "dtype", "auto", DTYPE_CHOICES),
        quantize=_choice(env, "quantize", defaults.get("quantize", "auto"), QUANTIZE_CHOICES),
        system_prompt=text("system_prompt"),
        max_new_tokens=_number(env, "MAX_NEW_TOKENS", defaults.get("max_new_tokens", 1024), int),
        temperature=_number(env, "TEMPERATURE", defaults.get("temperature", 0.8), float),
        top_p=_number(env, "TOP_P", defaults.get("top_p", 0.8), float),
        repetition_penalty=_number(env, "REPETITION_PENALTY", defaults.get("repetition_penalty", 1.005), float),
        concurrency_limit=concurrency,
        queue_size=_number(env, "QUEUE_SIZE", default_queue_size(concurrency), int),
        server_name=env.get("GRADIO_SERVER_NAME") or _default_server_name(env),
        server_port=_number(env, "GRADIO_SERVER_PORT", 7860, int),
        keep_lfs_cache=_flag(env, "KEEP_LFS_CACHE"),
        base_model_repo=text("base_model_repo").strip(),
        base_model_revision=text("base_model_revision").strip() or "main",
        base_model_dir=Path(env.get("BASE_MODEL_DIR") or APP_FOLDER / "base-model").expanduser().resolve(),
        visual_encoder_repo=text("visual_encoder_repo").strip(),
        visual_encoder_revision=text("visual_encoder_revision").strip() or "main",
        visual_encoder_dir=Path(env.get("VISUAL_ENCODER_DIR") or APP_FOLDER / "visual-encoder").expanduser().resolve(),
        engine=engine,
        engine_url=text("engine_url").strip(),
        engine_model=text("engine_model").strip(),
        engine_args=_command_line(env, "ENGINE_ARGS"),
        engine_command=_command_line(env, "ENGINE_COMMAND"),
        engine_timeout=_number(env, "ENGINE_TIMEOUT", 60.0, float),
        engine_start_timeout=_number(env, "ENGINE_START_TIMEOUT", 900.0, float),
        engine_api_key=env.get("ENGINE_API_KEY", "").strip(),
        repo_token=env.get("MODEL_REPO_TOKEN", "").strip(),
        repo_user=env.get("MODEL_REPO_USER", ""),
    )
