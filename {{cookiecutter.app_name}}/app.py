"""The chat demo: ``python app.py``. This is the file to make the page your own.

The model and every other setting live in settings.json, and each one can be
overridden by an environment variable. The xlab_chat package runs the download,
the model and the page; `cruft update` keeps it current, so edit here, not there.
"""

import xlab_chat

settings = xlab_chat.load_settings()

TITLE = settings.app_title  # or your own text, e.g. TITLE = "我的学习助手"
DESCRIPTION = settings.description  # Markdown shown under the title
EXAMPLES = settings.example_prompts  # prompts offered under the chat box, e.g. ["你好", "讲个故事"]
THEME = "soft"  # a gradio theme: "default", "soft", "glass", "monochrome", "ocean" or "citrus"


def extra_components(gr):
    """Add your own components under the chat, e.g. gr.Markdown("Fine-tuned with XTuner on my notes.")."""


if __name__ == "__main__":
    xlab_chat.launch(settings, title=TITLE, description=DESCRIPTION, examples=EXAMPLES, theme=THEME,
                     extra=extra_components)
