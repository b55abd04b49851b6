"""One user's reply on its way from the engine's thread to the browser, in a few updates instead of one per token.

Every update costs the page the same (gradio rebuilds, diffs and sends the whole chat), whatever it carries, so
updates go out at a cadence, not per token: the first text at once, later text at most every ``cadence()``
seconds, and the end of the reply (or an error) at once, so the final text is never late or lost. The engine's
thread hands items over without waking the event loop for each one: only a waiting reader is woken.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import AsyncIterator, Callable, List, Optional

FASTEST_S = 0.04  # a lone user: 25 updates a second, as smooth as the eye needs
SLOWEST_S = 0.25  # a crowd: 4 updates a second still reads as a stream
PAGE_UPDATES_PER_S = 400  # all users' updates together that the page sends at most, in between


def cadence(streams: int) -> float:
    """Seconds between one user's updates, so that the page's work stays flat as users and tokens/s grow."""
    return min(SLOWEST_S, max(FASTEST_S, streams / PAGE_UPDATES_PER_S))


class Inbox:
    """Items put by any thread, taken in batches on the page's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._items: List[object] = []
        self._lock = threading.Lock()
        self._waiter: Optional[asyncio.Future] = None
        self._text_wakes = True  # False while the reader waits for its next cadence: only an end may wake it

    def put(self, item: object) -> None:
        """Called by the engine's thread for each piece of text, and once with the end or an error."""
        with self._lock:
            self._items.append(item)
            waiter = self._waiter
            if waiter is None or (isinstance(item, str) and not self._text_wakes):
                return
            self._waiter = None
        with contextlib.suppress(RuntimeError):  # the loop is gone: the server is shutting down
            self._loop.call_soon_threadsafe(_wake, waiter)

    async def take(self, until: float = 0.0) -> List[object]:
        """Everything put so far: wait for a first item, then until the loop's time ``until`` unless the reply ends."""
        await self._wait(None, text_wakes=True)
        hold = until - self._loop.time()
        if hold > 0:
            await self._wait(hold, text_wakes=False)
        with self._lock:
            items, self._items = self._items, []
        return items

    async def _wait(self, timeout: Optional[float], text_wakes: bool) -> None:
        with self._lock:
            if any(text_wakes or not isinstance(item, str) for item in self._items):
                return
            waiter = self._waiter = self._loop.create_future()
            self._text_wakes = text_wakes
        try:
            await asyncio.wait_for(waiter, timeout)
        except asyncio.TimeoutError:
            pass
        finally:
            with self._lock:
                self._waiter = None


def _wake(waiter: asyncio.Future) -> None:
    if not waiter.done():
        waiter.set_result(None)


async def batches(inbox: Inbox, pace: Callable[[], float]) -> AsyncIterator[List[object]]:
    """The inbox's items, batched: the first at once, then one batch per ``pace()`` seconds, an end at once."""
    loop = asyncio.get_running_loop()
    next_due = 0.0
    while True:
        items = await inbox.take(next_due)
        yield items
        next_due = loop.time() + pace()
