"""Download the model and start the engine in the background, so the page is served at once.

The download runs here, in the page process: it is standard library only, its
progress feeds the status directly, and a restarted engine then only has to load
the verified folder. The engine process loads and generates (engines/process.py).

The status object is what the page and the ``/status`` API show while a 15 GB
model is pulled and loaded, and what they show if the start fails.
"""

from __future__ import annotations

import threading
import time
import traceback
from pathlib import Path
from typing import Optional, Tuple, Union
from urllib.parse import urlsplit

from .engines.openai_api import OpenAIEngine
from .engines.process import EngineProcess, LoadSpec
from .engines.server import NAMES, ServerEngine
from .model.adapter import OFFICIAL_BASES
from .model.adapter_check import is_adapter
from .model.check import check_settings
from .model.download import ensure_model, local_copy_is_good
from .model.endpoint import Endpoint, EndpointError, check_endpoint
from .model.git_tools import RepoError
from .model.llava_layout import OFFICIAL_CLIP, LlavaLayout, default_visual_encoder, find_llava
from .model.repo_url import hub_of
from .model.source import ModelSource, resolve_source, same_host
from .settings import Settings

Engine = Union[EngineProcess, ServerEngine, OpenAIEngine]


class ModelStatus:
    """Thread-safe stage of the start: checking, waiting, downloading, verifying, loading, ready, restarting or
    failed. It is also what the engine process reports to."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.started = time.monotonic()
        self.stage = "checking"
        self.done = 0
        self.total = 0
        self.error = ""
        self.engine: Optional[Engine] = None
        self.engine_name = ""  # what starts, e.g. LMDeploy (shown while it starts)
        self.images = False  # the model reads images (an XTuner LLaVA folder): the page shows its image chat
        self.page_url = ""  # where the chat is, said again once it is ready
        self.ready = threading.Event()

    def progress(self, stage: str, done: int, total: int) -> None:
        with self.lock:
            if self.stage == "failed":  # a failure stands: later progress must not hide it
                return
            self.stage, self.done, self.total = stage, done, total

    def fail(self, message: str) -> None:
        with self.lock:
            self.stage, self.error = "failed", message
        print(f"ERROR: {message}", flush=True)
        print("The page still opens and shows this error: fix the cause, then start the app again.", flush=True)

    def succeed(self, engine: Engine) -> None:
        print(f"[engine] ready on {engine.label}" + (f": chat at {self.page_url}" if self.page_url else ""), flush=True)
        with self.lock:  # said before /status says ready, so the log never lags behind the page
            self.stage, self.engine, self.error = "ready", engine, ""
        self.ready.set()

    engine_ready = succeed

    def engine_restarting(self, reason: str) -> None:
        with self.lock:
            self.stage, self.engine, self.error = "restarting", None, reason
            self.started = time.monotonic()
        self.ready.clear()

    def engine_failed(self, message: str) -> None:
        with self.lock:
            self.engine = None
        self.fail(message)

    @property
    def percent(self) -> int:
        return 100 * self.done // self.total if self.total else 0

    def snapshot(self) -> dict:
        with self.lock:
            return {
                "stage": self.stage,
                "done_bytes": self.done,
                "total_bytes": self.total,
                "percent": self.percent,
                "elapsed_s": round(time.monotonic() - self.started, 1),
                "error": self.error,
                "engine": self.engine_name,
                "device": self.engine.label if self.engine else "",
                "generating": self.engine.active if self.engine else 0,
                "images": self.images,
            }


def model_source(settings: Settings) -> ModelSource:
    if settings.model_path is not None:
        return ModelSource(url="", revision=settings.model_revision, local_folder=settings.model_path)
    return resolve_source(settings.model_repo, settings.model_revision)


def preflight(settings: Settings, source: ModelSource) -> None:
    """Check the repo before a long download, so a broken one fails in seconds rather than after 15 GB."""
    if source.local_folder is not None or local_copy_is_good(settings.model_dir, source):
        return
    report = check_settings(settings)
    print(report.render(), flush=True)
    if report.failed:
        what = "; ".join(f"{check.title}: {check.detail}" for check in report.failed)
        fix = "; ".join(check.fix for check in report.failed if check.fix) or "fix the model repo and restart"
        raise RepoError(f"the model repo check failed ({what})", fix)


def connect(settings: Settings, status: ModelStatus) -> None:
    """ENGINE=openai: no download; the server must answer, accept the key and serve the model."""
    status.progress("connecting", 0, 0)
    try:
        endpoint = Endpoint.from_url(settings.engine_url, settings.engine_model, settings.engine_api_key,
                                     settings.engine_timeout)
        status.engine_name = endpoint.shown
        verdict, names = check_endpoint(endpoint)
    except EndpointError as error:
        status.fail(str(error))
        return
    except Exception as error:  # a bug, not a user mistake; the key is never part of what is shown
        traceback.print_exc()
        status.fail(f"the engine server could not be checked ({type(error).__name__})")
        return
    if verdict == "unlisted":
        shown = ", ".join(names[:5]) + (" …" if len(names) > 5 else "")
        status.fail(f"the server at {endpoint.base} does not list the model {settings.engine_model!r} (it lists:"
                    f" {shown}) — set ENGINE_MODEL to one of those names")
        return
    status.succeed(OpenAIEngine(endpoint, f"{settings.engine_model} @ {endpoint.shown.split('//', 1)[1]}"))


def make_engine(settings: Settings, status: ModelStatus) -> Union[EngineProcess, ServerEngine]:
    """The engine process for ENGINE=transformers (started at once: its torch import overlaps the download),
    or a launched server for lmdeploy, vllm, llamacpp or an ENGINE_COMMAND."""
    if settings.engine_command or settings.engine in ("lmdeploy", "vllm", "llamacpp"):
        status.engine_name = NAMES["command" if settings.engine_command else settings.engine]
        return ServerEngine(status, settings.engine, settings.engine_args, settings.engine_command,
                            settings.engine_start_timeout, settings.engine_timeout)
    return EngineProcess(status)


def ensure_base(settings: Settings, status: ModelStatus, what: str = "a LoRA adapter") -> Path:
    """The adapter's base model, verified and kept in a folder of its own (BASE_MODEL_DIR), so that several
    adapter apps on one machine can share one copy."""
    if not settings.base_model_repo:
        raise RepoError(f"the model repo holds {what}, and no base model was given",
                        f"set BASE_MODEL_REPO to the model it was trained on, e.g. {OFFICIAL_BASES}")
    return _ensure_other(settings, status, settings.base_model_repo, settings.base_model_revision,
                         settings.base_model_dir)


def _ensure_other(settings: Settings, status: ModelStatus, repo: str, revision: str, folder: Optional[Path]) -> Path:
    """A second repo the model needs, verified into its own folder; MODEL_REPO_TOKEN goes to the model's host only."""
    shared = same_host(repo, settings.model_repo)
    assert folder is not None
    return ensure_model(resolve_source(repo, revision), folder, token=settings.repo_token if shared else "",
                        user=settings.repo_user if shared else "", keep_lfs_cache=settings.keep_lfs_cache,
                        progress=status.progress)


def ensure_llava_parts(settings: Settings, status: ModelStatus, layout: LlavaLayout) -> Tuple[Path, Path]:
    """The LLM (the base, unless the LLaVA folder holds it whole) and the CLIP tower (VISUAL_ENCODER_REPO, else
    CLIP-ViT-L/14-336 from the model's hub, unless the folder holds a trained tower)."""
    llm = layout.llm or ensure_base(settings, status, "an XTuner LLaVA model (projector and adapters)")
    if layout.visual_encoder is not None:
        return llm, layout.visual_encoder
    repo = settings.visual_encoder_repo or default_visual_encoder(hub_of(settings.model_repo))
    print(f"[model] the visual encoder comes from {repo}", flush=True)
    try:
        return llm, _ensure_other(settings, status, repo, settings.visual_encoder_revision,
                                  settings.visual_encoder_dir)
    except RepoError as error:
        raise RepoError(f"the visual encoder could not be downloaded ({error.what})",
                        f"set VISUAL_ENCODER_REPO to a reachable copy of the CLIP tower the model was trained with,"
                        f" e.g. {OFFICIAL_CLIP}") from None


def prepare(settings: Settings, status: ModelStatus, engine: Union[EngineProcess, ServerEngine]) -> None:
    try:
        source = model_source(settings)
        preflight(settings, source)
        folder = ensure_model(
            source,
            settings.model_dir,
            token=settings.repo_token,
            user=settings.repo_user,
            keep_lfs_cache=settings.keep_lfs_cache,
            progress=status.progress,
        )
        adapter, llava, visual_encoder = "", "", ""
        layout = find_llava(folder)
        if layout is not None:  # an XTuner LLaVA folder: the base LLM and CLIP come from their own repos
            if isinstance(engine, ServerEngine):
                raise RepoError(f"the model repo holds an XTuner LLaVA model, which {engine.name} does not load",
                                "use ENGINE=transformers: it serves XTuner LLaVA folders with image upload")
            llava, status.images = str(folder), True
            folder, clip = ensure_llava_parts(settings, status, layout)
            visual_encoder = str(clip)
        elif is_adapter([path.name for path in folder.iterdir()]):  # a LoRA adapter: the base comes from its repo
            if isinstance(engine, ServerEngine):
                raise RepoError(f"the model repo holds a LoRA adapter, and {engine.name} serves whole models only",
                                "use ENGINE=transformers (it merges the adapter at load), or deploy the merged"
                                " model (xtuner convert merge)")
            adapter, folder = str(folder), ensure_base(settings, status)
        status.progress("starting" if isinstance(engine, ServerEngine) else "loading", 0, 0)
        print(f"[engine] loading {folder}" + (f" with the adapter {adapter}" if adapter else "")
              + (f" with the LLaVA parts in {llava} and the visual encoder {visual_encoder}" if llava else ""),
              flush=True)
        engine.load(LoadSpec(str(folder), settings.hardware, settings.dtype, settings.loader,
                             settings.concurrency_limit, settings.quantize, adapter, llava, visual_encoder))
    except (RepoError, ValueError, OSError) as error:
        engine.close()
        status.fail(str(error))
    except Exception as error:  # a bug, not a user mistake: keep the trace in the log
        engine.close()
        traceback.print_exc()
        status.fail(f"the model could not be prepared ({type(error).__name__}: {error})")


def page_url(settings: Settings) -> str:
    """The address to open on this machine (a platform routes its own address to it)."""
    host = "127.0.0.1" if settings.server_name in ("0.0.0.0", "::", "") else settings.server_name
    return f"http://{host}:{settings.server_port}"


def _without_login(url: str) -> str:
    """The repo address without any login in it (a token never reaches the log)."""
    parts = urlsplit(url)
    return parts._replace(netloc=parts.netloc.rpartition("@")[2]).geturl() if parts.netloc else url


def announce(settings: Settings, url: str) -> None:
    """The first lines of ``python app.py``: where the page is, what the model is and where its files go."""
    print(f"The page will be at {url} in a few seconds; it shows the start-up progress until the chat is ready.",
          flush=True)
    if settings.engine == "openai":
        where = f"the engine server at {_without_login(settings.engine_url)}"
        print(f"The model: {settings.engine_model} on {where}; nothing is downloaded.", flush=True)
    elif settings.model_path is not None:
        print(f"The model: the local folder {settings.model_path} (MODEL_PATH), used as it is.", flush=True)
    else:
        print(f"The model: {_without_login(settings.model_repo)} (revision {settings.model_revision}), downloaded once"
              f" into {settings.model_dir} (MODEL_DIR); later starts check that copy and reuse it.", flush=True)


def start_in_background(settings: Settings) -> ModelStatus:
    status = ModelStatus()
    status.page_url = page_url(settings)
    announce(settings, status.page_url)
    if settings.engine == "openai":
        threading.Thread(target=connect, args=(settings, status), name="engine-connect", daemon=True).start()
        return status
    engine = make_engine(settings, status)
    threading.Thread(target=prepare, args=(settings, status, engine), name="model-start", daemon=True).start()
    return status
