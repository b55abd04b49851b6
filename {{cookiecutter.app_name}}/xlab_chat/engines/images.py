"""Uploaded images: decoded and refused here, with a reason the page can say in the user's language.

Pillow only (a gradio and transformers dependency), no torch: the page checks an upload before it sends it, and
the engine decodes it again on its side. Images travel as bytes; nothing is written to disk.
"""

from __future__ import annotations

import io

MAX_PIXELS = 40_000_000  # a 12000x12000 upload is refused before decoding (Pillow's own bomb limit is 89 M)
MAX_IMAGES = 1  # per conversation: XTuner's LLaVA recipes train on one image per conversation
NOT_IMAGE, CORRUPT, TOO_LARGE, ANIMATED, TEXT_ONLY, TOO_MANY = ("not_image", "corrupt", "too_large", "animated",
                                                               "text_only", "too_many")
MESSAGES = {
    NOT_IMAGE: "This file is not an image the model can read; send a PNG or JPEG photo.",
    CORRUPT: "The image is damaged and cannot be read; send it again or another one.",
    TOO_LARGE: f"The image is too large to read; send one under {MAX_PIXELS // 1_000_000} megapixels.",
    ANIMATED: "Animated images are not supported; send a single still image (PNG or JPEG).",
    TEXT_ONLY: "This model reads text only; send your question without the image.",
    TOO_MANY: f"This model looks at {MAX_IMAGES} image per conversation; clear the chat to ask about another one.",
}


class ImageError(ValueError):
    """An upload the model cannot look at; ``reason`` is one of the codes above, the message says it in English."""

    def __init__(self, reason: str) -> None:
        super().__init__(MESSAGES[reason])
        self.reason = reason


def open_image(data: bytes) -> object:
    """Decode an upload into an RGB PIL image; transparency is laid over white, as image viewers show it."""
    from PIL import Image, UnidentifiedImageError

    try:
        image = Image.open(io.BytesIO(data))
        if image.width * image.height > MAX_PIXELS:
            raise ImageError(TOO_LARGE)
        if getattr(image, "n_frames", 1) > 1:
            raise ImageError(ANIMATED)
        image.load()
    except ImageError:
        raise
    except (UnidentifiedImageError, Image.DecompressionBombError):
        raise ImageError(NOT_IMAGE) from None
    except (OSError, ValueError, SyntaxError, EOFError):
        raise ImageError(CORRUPT) from None
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        flat = Image.new("RGBA", image.size, (255, 255, 255, 255))
        flat.alpha_composite(image.convert("RGBA"))
        image = flat
    return image.convert("RGB")
