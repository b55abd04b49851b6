"""The line of users waiting for a free reply slot, kept by the page so that it can tell each one where they stand.

gradio's own queue shows a waiting user a spinner at best and refuses one too many with an English message, so
every chat is let through gradio at once and this line decides: ``slots`` replies stream at the same time, up to
``places`` users wait in arrival order and see how many are ahead of them, and one more is told the line is full.
It lives on the page's event loop (gradio runs the chat function there), so it needs no lock.
"""

from __future__ import annotations

import asyncio
import collections
from typing import AsyncIterator, Deque, Optional


class Ticket:
    """One user's place: granted a slot at once, or waiting until ``turn`` is done."""

    def __init__(self, turn: Optional[asyncio.Future]) -> None:
        self.turn = turn  # None: the slot was free at once

    @property
    def granted(self) -> bool:
        return self.turn is None or self.turn.done()


class WaitingLine:
    def __init__(self, slots: int, places: int) -> None:
        self.slots, self.places = slots, places
        self.active = 0  # replies holding a slot
        self._waiting: Deque[Ticket] = collections.deque()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def join(self) -> Optional[Ticket]:
        """A ticket, or None when every slot is busy and the line is full."""
        if self.active < self.slots and not self._waiting:
            self.active += 1
            return Ticket(None)
        if len(self._waiting) >= self.places:
            return None
        ticket = Ticket(asyncio.get_running_loop().create_future())
        self._waiting.append(ticket)
        return ticket

    async def turn(self, ticket: Ticket, every: float = 1.0, again: float = 5.0) -> AsyncIterator[int]:
        """How many are ahead, each time that changes (checked every ``every`` seconds), until the turn comes.

        The same number is also repeated every ``again`` seconds: gradio notices a closed tab only when it has
        something to send, and a user who left must not keep their place until their turn.
        """
        loop = asyncio.get_running_loop()
        shown, shown_at = -1, 0.0
        while not ticket.granted:
            ahead = self._waiting.index(ticket)
            if ahead != shown or loop.time() - shown_at >= again:
                shown, shown_at = ahead, loop.time()
                yield ahead
            await asyncio.wait({ticket.turn}, timeout=every)

    def leave(self, ticket: Ticket) -> None:
        """The reply ended, was stopped, or its user left while waiting: free the slot or the place."""
        if not ticket.granted:
            self._waiting.remove(ticket)
            return
        self.active -= 1
        while self._waiting and self.active < self.slots:
            self.active += 1
            self._waiting.popleft().turn.set_result(None)
