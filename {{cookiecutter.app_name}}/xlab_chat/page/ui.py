"""The chat page: serves at once, shows the model's start, then streams replies.

The same code runs on gradio 4.44, 5.x and 6.x: history is normalised in one
place and only the keyword arguments the installed version takes are passed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import json
import sys
import time
import traceback
import urllib.request
from dataclasses import dataclass
from typing import AsyncIterator, Callable, List, Optional, Tuple

import gradio as gr

from ..engines import protocol
from ..engines.images import ImageError
from ..model.repo_url import RepoURLError, normalise
from ..settings import Settings
from ..startup import ModelStatus
from .history import clean_text, normalise_history
from .line import WaitingLine
from .stream import Inbox, batches, cadence
from .texts import texts
from .uploads import Uploads

LATEX = [{"left": "$$", "right": "$$", "display": True}, {"left": "$", "right": "$", "display": False}]


@dataclass(frozen=True)
class PageLook:
    """What app.py customises: the texts above and below the chat, the theme and extra components."""

    title: str
    description: str
    examples: Tuple[str, ...] = ()
    theme: Optional[object] = None  # a built-in theme's name ("soft") or a gr.themes object
    extra: Optional[Callable[[object], None]] = None


def builtin_themes() -> dict:
    """gradio's own themes by lower-case name (soft, glass, …): the ones that need no download."""
    found = {}
    for name in dir(gr.themes):
        value = getattr(gr.themes, name)
        if isinstance(value, type) and issubclass(value, gr.themes.Base):
            found[name.lower()] = value
    return found


def resolve_theme(theme: object) -> object:
    """A built-in theme by name; gradio would look an unknown name up on the Hub, which a closed network can't."""
    if theme is None or not isinstance(theme, str):
        return theme
    themes = builtin_themes()
    if theme.strip().lower() in themes:
        return themes[theme.strip().lower()]()
    print(f"WARNING: THEME {theme!r} in app.py is not a built-in gradio theme — using the default; pick one of:"
          f" {', '.join(sorted(themes))}", flush=True)
    return None


def accepted(factory: object, **options: object) -> dict:
    """Only the keyword arguments this gradio version's ``factory`` takes: the API moved in 4.38, 5.0 and 6.0."""
    parameters = inspect.signature(factory).parameters
    return {key: value for key, value in options.items() if key in parameters}


def model_link(settings: Settings) -> str:
    if settings.model_path is not None:
        return f"`{settings.model_path.name}`"
    try:
        repo = normalise(settings.model_repo)
    except RepoURLError:
        return f"`{settings.model_repo}`"
    path = repo.git_url.rstrip("/")
    name = "/".join((path[:-4] if path.endswith(".git") else path).split("/")[-2:])
    return f"[{name}]({repo.web_url})" if repo.web_url else f"`{name}`"


def status_markdown(state: dict, t: dict) -> str:
    """Render one snapshot, so the text and the chat's visibility never disagree mid-failure."""
    elapsed = t["elapsed"].format(seconds=int(state["elapsed_s"]))
    stage = state["stage"]
    if stage == "ready":
        return f"✅ {t['ready']} · {t['runs_on']} **{state['device']}**"
    if stage == "failed":
        what, _, fix = state["error"].partition(" — ")
        advice = f"\n\n**{t['how_to_fix']}:** {fix}" if fix else ""
        return f"### ❌ {t['failed']}\n\n{what}{advice}"
    if stage == "starting":
        return f"⏳ {t['starting'].format(engine=state.get('engine') or '…')}… · {elapsed}"
    if stage == "downloading":
        return (f"⏳ {t['downloading']}: {state['done_bytes'] / 1e6:,.1f} / {state['total_bytes'] / 1e6:,.1f} MB"
                f" ({state['percent']}%) · {elapsed}")
    return f"⏳ {t.get(stage, stage)}… · {elapsed}"


def message_files(message: object) -> List[str]:
    """The uploads of a multimodal box's message: paths (gradio 4.26+) or file dicts (4.22-4.25)."""
    files = message.get("files") if isinstance(message, dict) else None
    paths = [f.get("path") if isinstance(f, dict) else f for f in files or []]
    return [path for path in paths if isinstance(path, str)]


def make_respond(settings: Settings, status: ModelStatus, t: dict, line: WaitingLine,
                 uploads: Optional[Uploads] = None):
    async def respond(message, history, system_prompt=settings.system_prompt, max_new_tokens=settings.max_new_tokens,
                      temperature=settings.temperature, top_p=settings.top_p,
                      repetition_penalty=settings.repetition_penalty):
        files = message_files(message)
        try:
            async for text in _respond(message, files, history, system_prompt, max_new_tokens, temperature, top_p,
                                       repetition_penalty):
                yield text
        finally:
            Uploads.delete_files(files)  # the bytes live on in memory for later turns; the file goes now

    async def _respond(message, files, history, system_prompt, max_new_tokens, temperature, top_p,
                       repetition_penalty):
        message = clean_text(message if isinstance(message, str) else str((message or {}).get("text") or ""))
        if not message.strip() and not files:
            yield t["empty"]
            return
        if status.engine is None:
            yield not_ready(status, t)
            return
        if files and (uploads is None or not status.images):
            yield t["image_text_only"]
            return
        try:
            images: List[bytes] = uploads.take(files) if uploads is not None and files else []
        except ImageError as error:
            yield t[f"image_{error.reason}"]
            return
        except OSError:
            yield t["image_corrupt"]
            return
        ticket = line.join()
        if ticket is None:  # said in the chat: gr.Error would also cover the chat with a bare "Error" badge
            yield "⏳ " + t["queue_full"].format(waiting=line.waiting)
            return
        try:  # Stop or a closed tab while waiting or streaming ends here too, and frees the place or the slot
            async for ahead in line.turn(ticket):
                yield t["queue_place"].format(place=ahead + 1)
            engine = status.engine
            if engine is None:  # the engine stopped while this user waited
                yield not_ready(status, t)
                return
            inbox = Inbox(asyncio.get_running_loop())
            known = uploads.known() if uploads is not None else None
            request = engine.chat(clean_text(system_prompt or ""), normalise_history(history, known), message,
                                  int(max_new_tokens), float(temperature), float(top_p), float(repetition_penalty),
                                  inbox.put, **({"images": images} if images else {}))
            try:
                async for reply in replies(inbox, t, lambda: cadence(line.active)):
                    yield reply
            finally:  # Stop, a disconnect or the end: the engine stops at once
                request.cancel()
        finally:
            line.leave(ticket)

    return respond


def not_ready(status: ModelStatus, t: dict) -> str:
    stage = status.snapshot()["stage"]
    if stage == "failed":
        return t["not_ready_failed"]
    return t["still_restarting"] if stage == "restarting" else t["still_loading"].format(percent=status.percent)


async def replies(inbox: Inbox, t: dict, pace: Callable[[], float]) -> AsyncIterator[str]:
    """The reply so far, once per batch of the engine's items, until it ends."""
    reply = ""
    async for items in batches(inbox, pace):
        before, finished = reply, False
        for item in items:
            reply, finished = add_item(reply, item, t)
            if finished:
                break
        if reply != before or (finished and not reply):
            yield reply
        if finished:
            return


def add_item(reply: str, item: object, t: dict) -> Tuple[str, bool]:
    """The reply with one item of the engine's stream added, and whether the reply is over."""
    if item is protocol.FINISHED:
        return reply, True
    if isinstance(item, protocol.Dropped):
        gr.Info(t["dropped"].format(count=item.turns))
        return reply, False
    if isinstance(item, protocol.InputTooLong):
        if item.limit <= 0:  # the server said the prompt is over its context, not by how much
            return t["too_long_server"], True
        return t["too_long"].format(tokens=item.tokens, limit=item.limit), True
    if isinstance(item, protocol.EngineStopped):
        return reply + ("\n\n" if reply else "") + "⚠️ " + t["engine_stopped"], True
    if isinstance(item, protocol.GenerationFailed) and item.kind == "ImageError":
        return reply + ("\n\n" if reply else "") + "⚠️ " + t.get(f"image_{item}", str(item)), True  # a reason code
    if isinstance(item, protocol.GenerationFailed) and item.kind == "EndpointError":
        return reply + ("\n\n" if reply else "") + f"⚠️ {item}", True  # the server's refusal says what to do
    if isinstance(item, Exception):
        name = item.kind if isinstance(item, protocol.GenerationFailed) else type(item).__name__
        return reply + "\n\n⚠️ " + t["generation_failed"].format(error=name), True
    return reply + item, False


def chat_interface(respond: Callable, textbox: object, chatbot: object, settings: Settings, t: dict, api_name: str,
                   multimodal: bool = False) -> object:
    """One ChatInterface with the generation sliders; only the keyword arguments this gradio takes."""
    buttons = {"submit_btn": t["submit"], "stop_btn": t["stop"]}
    on_textbox = accepted(type(textbox), **buttons)
    return gr.ChatInterface(
        respond,
        **accepted(
            gr.ChatInterface,
            chatbot=chatbot,
            textbox=textbox,
            type="messages",
            multimodal=multimodal,
            additional_inputs=[
                gr.Textbox(settings.system_prompt, label=t["system_prompt"], lines=2, render=False),
                gr.Slider(1, max(8192, settings.max_new_tokens), value=settings.max_new_tokens, step=1,
                          label=t["max_new_tokens"],
                          render=False),
                gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05, label=t["temperature"],
                          render=False),
                gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label=t["top_p"], render=False),
                gr.Slider(1.0, 2.0, value=settings.repetition_penalty, step=0.005,
                          label=t["repetition_penalty"], render=False),
            ],
            additional_inputs_accordion=gr.Accordion(t["settings"], open=False, render=False),
            **({} if on_textbox else buttons),
            clear_btn=t["clear"],
            retry_btn=None,
            undo_btn=None,
            api_name=api_name,
            concurrency_limit=None,  # every chat starts at once; the page's WaitingLine keeps the order
        ),
    )


def make_chatbot(elem_id: str) -> object:
    return gr.Chatbot(**accepted(gr.Chatbot, type="messages", height=520, latex_delimiters=LATEX,
                                 render_markdown=True, show_copy_button=True, buttons=["copy", "copy_all"],
                                 elem_id=elem_id, render=False))


def build_ui(settings: Settings, status: ModelStatus, look: PageLook, theme: object = None) -> gr.Blocks:
    """The text chat; beside it, hidden until the engine loads an XTuner LLaVA model, the chat with image upload
    (the model is only known once downloaded, and the page is served before that). One waiting line serves both."""
    t = texts(settings.ui_language)
    line = WaitingLine(settings.concurrency_limit, settings.queue_size)
    with gr.Blocks(title=look.title, **accepted(gr.Blocks, theme=theme)) as demo:
        gr.Markdown(f"# {look.title}\n{look.description}\n\n**{t['model']}:** {model_link(settings)}")
        status_line = gr.Markdown(status_markdown(status.snapshot(), t), elem_id="model-status")
        ready = status.engine is not None
        # gradio 5+ puts the Send/Stop buttons on the textbox, 4.x on the ChatInterface.
        textbox = gr.Textbox(placeholder=t["placeholder"] if ready else t["placeholder_loading"], interactive=ready,
                             show_label=False, scale=7, autofocus=True, elem_id="chat-input", render=False,
                             **accepted(gr.Textbox, submit_btn=t["submit"], stop_btn=t["stop"]))
        with gr.Column(elem_id="chat-area", visible=not status.images) as chat_area:
            chat_interface(make_respond(settings, status, t, line), textbox, make_chatbot("chatbot"), settings, t,
                           "chat")
            if look.examples:  # fill the box only: ChatInterface's examples would also reset the sliders
                gr.Examples([[prompt] for prompt in look.examples], inputs=[textbox], label=t["examples"])
        image_box = gr.MultimodalTextbox(
            placeholder=t["image_placeholder"], interactive=ready, show_label=False, scale=7, file_types=["image"],
            elem_id="image-chat-input", render=False,
            **accepted(gr.MultimodalTextbox, file_count="single", submit_btn=t["submit"], stop_btn=t["stop"]))
        with gr.Column(elem_id="image-chat-area", visible=status.images) as image_area:
            chat_interface(make_respond(settings, status, t, line, Uploads()), image_box,
                           make_chatbot("image-chatbot"), settings, t, "chat_images", multimodal=True)
        add_extra_components(look)

        def refresh():
            """Poll the start: unlock or hide the chat; once ready, poll slowly (the engine may restart)."""
            state = status.snapshot()
            stage = state["stage"]
            placeholder = t["placeholder"] if stage == "ready" else t["placeholder_loading"]
            return (
                status_markdown(state, t),
                gr.Column(visible=stage != "failed" and not state["images"]),
                gr.Textbox(interactive=stage == "ready", placeholder=placeholder),
                gr.Column(visible=stage != "failed" and state["images"]),
                gr.MultimodalTextbox(interactive=stage == "ready",
                                     placeholder=t["image_placeholder"] if stage == "ready" else placeholder),
                gr.Timer(value=3.0 if stage == "ready" else 1.0, active=stage != "failed"),
            )

        timer = gr.Timer(1.0)
        timer.tick(refresh, outputs=[status_line, chat_area, textbox, image_area, image_box, timer],
                   concurrency_limit=None, show_progress="hidden",
                   **accepted(timer.tick, api_visibility="private", show_api=False))
        status_json = gr.JSON(visible=False)
        gr.Button(visible=False).click(status.snapshot, outputs=status_json, api_name="status",
                                       concurrency_limit=None)
    return demo


def skip_absent_matplotlib() -> None:
    """gradio 5+ tries ``import matplotlib`` twice for every streamed update. When it is not installed each try
    searches every folder on sys.path again (a millisecond per update); a None in sys.modules makes Python answer
    "not installed" at once, as it would anyway."""
    if "matplotlib" not in sys.modules and importlib.util.find_spec("matplotlib") is None:
        sys.modules["matplotlib"] = None  # type: ignore[assignment]


def add_extra_components(look: PageLook) -> None:
    """The student's own components from app.py; a mistake there leaves them out with a message, not a dead page."""
    if look.extra is None:
        return
    try:
        look.extra(gr)
    except Exception as error:
        trace = traceback.extract_tb(error.__traceback__)[-1]
        print(f"ERROR: extra_components in app.py failed ({type(error).__name__}: {error}, line {trace.lineno})"
              " — the page runs without them; fix that function and restart", flush=True)


def serve(settings: Settings, status: ModelStatus, look: PageLook, boot_test: bool = False) -> None:
    theme = resolve_theme(look.theme)
    demo = build_ui(settings, status, look, theme)
    skip_absent_matplotlib()
    # No max_size: gradio's queue only passes events through (none waits there), and the WaitingLine tells a user
    # in their language when it is full.
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=None)
    # gradio runs at most max_threads events at once (40 by default), users waiting in the page's line included;
    # 40 more for the quick ones (each open tab's status poll).
    workers = settings.concurrency_limit + settings.queue_size + 40
    options = dict(server_name=settings.server_name, server_port=settings.server_port, show_error=True,
                   max_threads=workers, **accepted(demo.launch, theme=theme))
    if not boot_test:
        demo.launch(**options)
        return
    started = time.monotonic()
    demo.launch(**{**options, "server_name": "127.0.0.1", "server_port": None, "prevent_thread_lock": True})
    try:
        url = f"http://127.0.0.1:{demo.server_port}"
        with urllib.request.urlopen(url + "/config", timeout=30) as response:
            config = json.loads(response.read())
        with urllib.request.urlopen(url + "/", timeout=30) as response:
            response.read()
    except (OSError, ValueError) as error:
        print(f"ERROR: boot test: the page did not serve ({error}) — run `python app.py` to see why", flush=True)
        raise SystemExit(1) from None
    finally:
        demo.close()
    if config.get("title") != look.title:
        print(f"ERROR: boot test: the page's title is {config.get('title')!r}, not {look.title!r}", flush=True)
        raise SystemExit(1)
    print(f"boot test passed: the page served at {url} in {time.monotonic() - started:.1f} s (no model loaded)",
          flush=True)
