"""server/prompt_grid.py: an exchange returns once its last reply is in, keeps to the timeout,
and waits for no message whose push failed. (The real grids behind it are exercised by the
deployment and Ray simulation tests; its speed is measured in bench/deployment.py.)"""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from server.prompt_grid import PromptGrid


class ScriptedGrid:
    """Replies become ready at a given pull; a message pushed to node 0 fails (no id)."""

    def __init__(self, ready_at: dict[int, int | None]) -> None:
        self.ready_at, self.pulls = ready_at, 0

    def push_messages(self, messages):
        return ["" if m.metadata.dst_node_id == 0 else f"m{m.metadata.dst_node_id}"
                for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{node}"))
                for node, pull in self.ready_at.items()
                if pull is not None and pull == self.pulls and f"m{node}" in message_ids]

    def get_node_ids(self):
        return [1, 2, 3]


def _to(*nodes: int, kind: str = "train") -> list[SimpleNamespace]:
    return [SimpleNamespace(metadata=SimpleNamespace(dst_node_id=n, message_type=kind))
            for n in nodes]


def _answered(replies) -> list[str]:
    return sorted(r.metadata.reply_to_message_id for r in replies)


def test_the_exchange_ends_at_its_last_reply_and_skips_failed_pushes():
    grid = ScriptedGrid({1: 1, 2: 3, 3: 2})
    replies = PromptGrid(grid, 0.001).send_and_receive(_to(0, 1, 2, 3), timeout=60)
    assert _answered(replies) == ["m1", "m2", "m3"]
    assert grid.pulls == 3  # no look after the last reply, none for the failed push


def test_a_missing_reply_ends_the_exchange_at_the_timeout_with_the_others():
    grid = ScriptedGrid({1: 1, 2: None, 3: 2})
    replies = PromptGrid(grid, 0.01).send_and_receive(_to(1, 2, 3), timeout=0.2)
    assert _answered(replies) == ["m1", "m3"]
    assert grid.pulls >= 3  # it went on looking for node 2 after node 3's reply


class Clock:
    """time.monotonic and time.sleep on a clock that moves only when slept on."""

    def __init__(self) -> None:
        self.now = 0.0

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds


class TimedGrid:
    """Each node's reply is ready `ready[node]` clock seconds after its message was pushed."""

    def __init__(self, clock: Clock) -> None:
        self.clock, self.ready, self.pulls, self.seen_at = clock, {}, 0, {}

    def push_messages(self, messages):
        self.pushed = self.clock.now
        return [f"m{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids):
        self.pulls += 1
        due = [node for node, after in self.ready.items()
               if f"m{node}" in message_ids and self.clock.now >= self.pushed + after]
        for node in due:
            self.seen_at[node] = self.clock.now - self.pushed
        return [SimpleNamespace(metadata=SimpleNamespace(reply_to_message_id=f"m{n}"))
                for n in due]


def test_after_two_exchanges_of_a_kind_the_first_look_waits_for_the_replies_to_be_due(
        monkeypatch):
    import server.prompt_grid as prompt_grid

    clock = Clock()
    monkeypatch.setattr(prompt_grid, "time", clock)
    grid = TimedGrid(clock)
    prompt = PromptGrid(grid, 0.1)

    def exchange(kind: str, ready: dict[int, float]) -> int:
        grid.ready, grid.pulls, grid.seen_at = ready, 0, {}
        replies = prompt.send_and_receive(_to(*ready, kind=kind), timeout=600)
        assert _answered(replies) == sorted(f"m{n}" for n in ready)
        return grid.pulls

    slow_load = exchange("train", {1: 30.0, 2: 31.0})  # the first round loads the model
    assert slow_load > 300  # every 0.1 s until the first reply
    assert exchange("evaluate", {1: 2.0, 2: 2.0}) >= 20  # another kind: its own history
    assert exchange("train", {1: 10.0, 2: 10.5}) >= 100
    # Two train exchanges seen: every 3 s (Flower's pace) until 0.7 of the shorter first reply
    # (10 s), then every 0.1 s.
    pulls = exchange("train", {1: 10.0, 2: 10.4})
    assert pulls <= 40, pulls  # at 0, 3, 6 and 7 s, then every 0.1 s
    assert max(grid.seen_at.values()) <= 10.4 + 0.1 + 1e-9  # no reply seen later than before
    # An exchange faster than that is seen within 3 s, and the next one is looked for sooner.
    exchange("train", {1: 2.0, 2: 2.0})
    assert min(grid.seen_at.values()) == pytest.approx(3.0)
    exchange("train", {1: 2.0, 2: 2.0})
    assert min(grid.seen_at.values()) == pytest.approx(2.1)  # 0.7 of 3 s
    # The timeout still holds: a missing reply ends the exchange at it, the others returned.
    grid.ready, grid.pulls = {1: 1.0, 2: 1e9}, 0
    start = clock.now
    replies = prompt.send_and_receive(_to(1, 2), timeout=3.0)
    assert _answered(replies) == ["m1"] and clock.now - start == pytest.approx(3.0)


def test_everything_else_is_the_wrapped_grids():
    assert PromptGrid(ScriptedGrid({}), 0.1).get_node_ids() == [1, 2, 3]



def test_the_serverapp_has_replies_pulled_before_their_objects_asked_for_within_0_05_s(
        monkeypatch):
    """The deployment grid's pull of a reply whose sender has pushed the message but not yet
    all its objects: Flower's first retry comes after 1 s; in fedlora's ServerApp, whatever
    grid it talks through (reply-poll-interval=0 too), after 0.05 s."""
    import functools
    import importlib
    import time

    from flwr.app import Context, RecordDict

    import server.app as server_app
    from common.config import FedLoraConfig
    from tests.conftest import not_stored_at_first

    http_grid = importlib.import_module("flwr.superlink.grid.http_grid")
    monkeypatch.setattr(http_grid, "pull_objects", http_grid.pull_objects)
    flowers = http_grid.pull_objects
    ran = []
    monkeypatch.setattr(server_app, "run_federation", lambda grid, cfg: ran.append(grid))
    run_config = FedLoraConfig(reply_poll_interval=0, packed_arrays=False).to_run_config()
    for _ in range(2):  # a second run in the same process wraps nothing more
        server_app.main(ScriptedGrid({}), Context(run_id=1, node_id=0, node_config={},
                                                  state=RecordDict(), run_config=run_config))
    assert len(ran) == 2 and isinstance(ran[0], ScriptedGrid)  # no PromptGrid at 0
    assert http_grid.pull_objects.func is flowers
    assert isinstance(http_grid.pull_objects, functools.partial)
    started = time.monotonic()
    pulled = http_grid.pull_objects(["reply"], pull_object_fn=not_stored_at_first())
    assert pulled == {"reply": b"bytes"}
    assert time.monotonic() - started < 0.5
