"""Images users upload: read once into memory, checked, and their files deleted from gradio's cache.

The model needs a conversation's image again at every later turn, so its bytes stay in this process's memory,
keyed by the upload's path (random, per upload), and the file on disk goes once the reply is written: nothing is
kept on disk after the reply, and nothing can be fetched back by URL. Memory is bounded: the oldest go first.
"""

from __future__ import annotations

import contextlib
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Sequence

from ..engines.images import open_image

MAX_BYTES = 20_000_000  # one upload; a photo from a phone is 2-8 MB
HELD_BYTES = 512_000_000  # all conversations' images together


class Uploads:
    def __init__(self, held_bytes: int = HELD_BYTES) -> None:
        self.lock = threading.Lock()
        self.held: "OrderedDict[str, bytes]" = OrderedDict()
        self.held_bytes = held_bytes

    def take(self, paths: Sequence[str]) -> List[bytes]:
        """The uploads' bytes, each checked as an image (ImageError says why not); remembered for later turns."""
        from ..engines.images import TOO_LARGE, ImageError

        images = []
        for path in paths:
            file = Path(path)
            if file.stat().st_size > MAX_BYTES:
                raise ImageError(TOO_LARGE)
            data = file.read_bytes()
            open_image(data)  # refuse here, in the user's language, what the model could not read
            images.append(data)
            with self.lock:
                self.held[path] = data
                while sum(len(d) for d in self.held.values()) > self.held_bytes and len(self.held) > 1:
                    self.held.popitem(last=False)
        return images

    def known(self) -> Dict[str, bytes]:
        with self.lock:
            return dict(self.held)

    @staticmethod
    def delete_files(paths: Sequence[str]) -> None:
        """Remove the uploaded files (and their per-upload folder, when gradio made one and it is now empty)."""
        for path in paths:
            file = Path(path)
            with contextlib.suppress(OSError):
                file.unlink()
            with contextlib.suppress(OSError):
                file.parent.rmdir()
