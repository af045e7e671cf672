"""The Grid a run talks to: each exchange ends as soon as its last reply is in.

Flower's deployment Grid (flwr 1.41, 1.42) looks for replies every 3 s inside send_and_receive,
so every exchange (a round has two, training and evaluation) waited up to 3 s after its last
reply. This one sends with the Grid's public push_messages and asks pull_messages for the
missing replies every `poll_seconds` (config reply-poll-interval); everything else is the
wrapped grid's.

Each look is a request the SuperLink serves (~4-11 ms of its CPU on 2 cores, measured in
bench/deployment.py), and during training none can find a reply: once two exchanges of a kind
(train, evaluate, ...) have been seen, it looks only every IDLE_LOOK_SECONDS (Flower's own
pace, so a stopped run is still noticed as soon) until FIRST_LOOK_SHARE of the shorter of their
first replies' times has passed. A faster exchange is seen late by at most IDLE_LOOK_SECONDS;
a slower one costs nothing.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable

from flwr.app import Message
from flwr.serverapp import Grid

FIRST_LOOK_SHARE = 0.7
EXCHANGES_REMEMBERED = 2
IDLE_LOOK_SECONDS = 3.0


class PromptGrid:
    def __init__(self, grid: Grid, poll_seconds: float) -> None:
        self.grid, self.poll_seconds = grid, poll_seconds
        self.first_reply_seconds: dict[str, deque[float]] = {}  # by message type

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> list[Message]:
        """Flower's contract: the replies that came within `timeout` (None: all of them)."""
        messages = list(messages)
        kind = messages[0].metadata.message_type if messages else ""
        sent = time.monotonic()
        waiting = {message_id for message_id in self.grid.push_messages(messages) if message_id}
        deadline = None if timeout is None else sent + timeout
        seen = self.first_reply_seconds.setdefault(kind, deque(maxlen=EXCHANGES_REMEMBERED))
        due = sent + FIRST_LOOK_SHARE * min(seen) if len(seen) == EXCHANGES_REMEMBERED else sent
        replies: list[Message] = []
        while waiting:
            arrived = list(self.grid.pull_messages(waiting))
            if arrived and not replies:
                seen.append(time.monotonic() - sent)
            replies.extend(arrived)
            waiting.difference_update(m.metadata.reply_to_message_id for m in arrived)
            left = None if deadline is None else deadline - time.monotonic()
            if not waiting or (left is not None and left <= 0):
                break
            now = time.monotonic()
            pause = self.poll_seconds if now >= due else min(IDLE_LOOK_SECONDS, due - now)
            time.sleep(pause if left is None else min(pause, left))
        return replies

    def __getattr__(self, name: str):
        return getattr(self.grid, name)
