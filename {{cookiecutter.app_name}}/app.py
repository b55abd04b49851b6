"""The chat page: serves at once, shows the model's start, then streams replies.

Run it with ``python app.py``. Every setting is in settings.py and can be
changed with an environment variable.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
# Behind a proxy gradio's own localhost check fails unless loopback bypasses it.
os.environ["no_proxy"] = os.environ["NO_PROXY"] = ",".join(
    filter(None, [os.environ.get("no_proxy") or os.environ.get("NO_PROXY"), "localhost,127.0.0.1"])
)

import gradio as gr  # noqa: E402

from chat_history import clean_text, normalise_history  # noqa: E402
from engine import Generation, InputTooLong  # noqa: E402
from settings import Settings, SettingsError, load_settings  # noqa: E402
from startup import ModelStatus, start_in_background  # noqa: E402


def status_markdown(status: ModelStatus) -> str:
    state = status.snapshot()
    stage, elapsed = state["stage"], state["elapsed_s"]
    if stage == "ready":
        return f"✅ Model ready on **{state['device']}**"
    if stage == "failed":
        return f"❌ **The model could not start.** {state['error']}"
    if stage == "downloading":
        return (
            f"⏳ Downloading the model: {state['done_bytes'] / 1e6:,.1f} / {state['total_bytes'] / 1e6:,.1f} MB"
            f" ({state['percent']}%) · {elapsed:.0f} s"
        )
    return f"⏳ {stage.capitalize()} the model… · {elapsed:.0f} s"


def make_respond(settings: Settings, status: ModelStatus):
    async def respond(message, history, system_prompt=settings.system_prompt, max_new_tokens=settings.max_new_tokens,
                      temperature=settings.temperature, top_p=settings.top_p,
                      repetition_penalty=settings.repetition_penalty):
        message = clean_text(message if isinstance(message, str) else str((message or {}).get("text", "")))
        if not message.strip():
            yield "Please type a message."
            return
        engine = status.engine
        if engine is None:
            yield status_markdown(status)
            return
        try:
            ids, dropped = engine.fit_prompt(clean_text(system_prompt or ""), normalise_history(history), message,
                                             int(max_new_tokens))
        except InputTooLong as error:
            yield str(error)
            return
        if dropped:
            gr.Info(f"The oldest {dropped} turn(s) were left out to fit the model's context.")
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()

        def emit(item: object) -> None:
            with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
                loop.call_soon_threadsafe(inbox.put_nowait, item)

        generation = engine.start(ids, emit, int(max_new_tokens), float(temperature), float(top_p),
                                  float(repetition_penalty), dropped)
        reply, finished = "", False
        try:
            while not finished:
                before = reply
                items = [await inbox.get()]
                while not inbox.empty():  # send what piled up as one update
                    items.append(inbox.get_nowait())
                for item in items:
                    if item is Generation.DONE:
                        finished = True
                    elif isinstance(item, Exception):
                        finished = True
                        reply += f"\n\n⚠️ Generation failed: {type(item).__name__}. Please try again."
                    else:
                        reply += item
                if reply != before or (finished and not reply):
                    yield reply
        finally:  # Stop, a disconnect or the end: free the slot at once
            generation.cancel()

    return respond


def build_ui(settings: Settings, status: ModelStatus) -> gr.Blocks:
    with gr.Blocks(title=settings.app_title) as demo:
        gr.Markdown(f"# {settings.app_title}\n{settings.description}")
        status_line = gr.Markdown(status_markdown(status))
        gr.Timer(1.0).tick(lambda: status_markdown(status), outputs=status_line, concurrency_limit=None,
                           show_progress="hidden")
        status_json = gr.JSON(visible=False)
        gr.Button(visible=False).click(status.snapshot, outputs=status_json, api_name="status",
                                       concurrency_limit=None)
        gr.ChatInterface(
            make_respond(settings, status),
            additional_inputs=[
                gr.Textbox(settings.system_prompt, label="System prompt", lines=2),
                gr.Slider(1, 8192, value=settings.max_new_tokens, step=1, label="Max new tokens"),
                gr.Slider(0.0, 2.0, value=settings.temperature, step=0.05, label="Temperature (0 = greedy)"),
                gr.Slider(0.05, 1.0, value=settings.top_p, step=0.05, label="Top-p"),
                gr.Slider(1.0, 2.0, value=settings.repetition_penalty, step=0.005, label="Repetition penalty"),
            ],
            api_name="chat",
        )
    return demo


def main() -> None:
    try:
        settings = load_settings()
    except SettingsError as error:
        print(f"ERROR: {error}", file=sys.stderr)
        sys.exit(2)
    status = start_in_background(settings)
    demo = build_ui(settings, status)
    demo.queue(default_concurrency_limit=settings.concurrency_limit, max_size=4 * settings.concurrency_limit + 16)
    demo.launch(server_name=settings.server_name, server_port=settings.server_port, show_error=True)


if __name__ == "__main__":
    main()
