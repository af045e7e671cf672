"""Watching a run: the live table of rounds on a terminal, line-per-round output elsewhere, and
TensorBoard event files that hold what metrics.jsonl holds."""

from __future__ import annotations

import io
import threading
import time

import pytest
from rich.console import Console

from common.config import FedLoraConfig
from server.app import run_federation
from server.outputs import RunDirectory
from simulations.inprocess import InProcessGrid
from simulations.progress import RoundProgress

pytestmark = pytest.mark.usefixtures("task_identity")


def _follow_two_rounds(run: RunDirectory, console: Console) -> RoundProgress:
    cfg = FedLoraConfig(num_rounds=2)
    with RoundProgress(run, cfg, console) as progress:
        follower = threading.Thread(target=progress.follow)
        follower.start()
        run.append_round({"round": 0, "server": {"accuracy": 0.1234, "loss": 4.0},
                          "seconds": 1.0})
        time.sleep(1.0)
        run.append_round({"round": 1, "server": {"accuracy": 0.5678, "loss": 2.0},
                          "train": {"train-loss": 3.0},
                          "train-per-client": [{"node": 1, "dp-epsilon": 1.5}],
                          "dropped": [{"node": 2, "reason": "no reply"}], "seconds": 2.0})
        time.sleep(1.0)
        progress.stop()
        follower.join()
    progress.print_summary(3.0)
    return progress


def test_a_terminal_gets_a_live_table_that_grows_with_the_rounds(tmp_path):
    screen = io.StringIO()
    _follow_two_rounds(RunDirectory(tmp_path), Console(file=screen, force_terminal=True,
                                                       width=160))
    frames = screen.getvalue()
    # Redrawn in place: the first frame holds round 0 only, a later one both rounds.
    # Redrawn as rounds land: an earlier frame shows round 0 alone.
    drawn = frames.split("fedlora run")
    assert any("0.1234" in frame and "0.5678" not in frame for frame in drawn[:-1])
    last_frame = frames[frames.rindex("fedlora run"):]
    assert "0.1234" in last_frame and "0.5678" in last_frame
    assert "epsilon" in last_frame and "1.5000" in last_frame  # DP shows up as a column
    assert "round   1 |" not in frames  # no log lines on a terminal


def test_a_log_gets_one_line_per_round_then_the_table(tmp_path):
    log = io.StringIO()
    _follow_two_rounds(RunDirectory(tmp_path), Console(file=log, force_terminal=False,
                                                       width=160))
    text = log.getvalue()
    assert "round   0 | accuracy 0.1234" in text and "round   1 | accuracy 0.5678" in text
    assert text.index("round   1 |") < text.index("┃ round ┃")  # the table comes at the end


def test_tensorboard_events_hold_every_round_of_metrics_jsonl(banking_subset, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=2,
                        num_rounds=2, local_steps=2, max_eval_examples=40, lora_r=4,
                        out_dir=str(tmp_path / "run"), tensorboard=True)
    run = run_federation(InProcessGrid(cfg, 2), cfg)
    rounds = run.read_rounds()
    events = EventAccumulator(str(run.path / "tensorboard"))
    events.Reload()
    accuracy = events.Scalars("server/accuracy")
    assert [e.step for e in accuracy] == [0, 1, 2]
    assert [e.value for e in accuracy] == pytest.approx(
        [r["server"]["accuracy"] for r in rounds], abs=1e-6)
    assert [e.step for e in events.Scalars("clients/train-loss")] == [1, 2]
    assert [e.value for e in events.Scalars("bytes/up")] == pytest.approx(
        [r["bytes-up"] for r in rounds])
    assert len([t for t in events.Tags()["scalars"] if t.startswith("client-train-loss/")]) == 2

