"""After each round: score the global adapter, append the round's line, checkpoint the round."""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from flwr.app import ArrayRecord, MetricRecord

from common.config import FedLoraConfig
from common.records import record_to_adapter
from server.checkpoint import BestRound, RunState, Stateful, save_run_state
from server.evaluation import GlobalEvaluator
from server.federation_loop import Stop, StopReason
from server.outputs import RunDirectory
from server.round_record import RoundStats
from server.selection import improves, should_stop
from server.strategies.fedavg import LoraFedAvg
from server.tensorboard import RoundScalars


@dataclass
class PendingRound:
    """A round handed to the recorder: scored, then written with its run state."""

    round: int
    arrays: ArrayRecord
    stats: RoundStats
    started: float  # when the round began (time.time())
    state: RunState  # its best round still to be chosen
    offsets: dict[str, torch.Tensor]  # what the global model adds to the base (exact)


class Ahead(NamedTuple):
    """A round's global adapter being scored in a thread (RoundRecorder.score_ahead)."""

    round: int
    arrays: ArrayRecord
    thread: threading.Thread
    scored: dict  # "metrics" or "error", once the thread is done


class RoundRecorder:
    """The `evaluate_fn` of the federation loop (server/federation_loop.py).

    Round 0 (the initial adapter) is scored in a background thread while round 1 trains: it
    depends on nothing round 1 does, and run in line it held back the first training step by
    the whole evaluation. What its checkpoint holds (strategy state, sampling RNG) is taken
    before round 1 starts, so a resume from round 0 continues exactly as before. Every later
    call first waits for it, so metrics.jsonl stays in round order; call `wait()` before
    reading the run's rounds, and on the way out of a failed run.
    """

    def __init__(self, run: RunDirectory, evaluator: GlobalEvaluator, strategy: LoraFedAvg,
                 cfg: FedLoraConfig, parts: Sequence[Stateful] = (),
                 scalars: RoundScalars | None = None, best: BestRound | None = None) -> None:
        self.run, self.evaluator, self.cfg = run, evaluator, cfg
        # Besides the strategy, what carries state from round to round (client-level DP's
        # accountant, the head round's release count, the loop's retried attempts):
        # checkpointed with every round.
        self.strategy, self.parts = strategy, [strategy, *parts]
        self.scalars = scalars  # TensorBoard, when asked for
        # The best round so far by cfg.selection_key: checkpointed with every round, so a
        # resumed run keeps it.
        self.best = best
        # Early stopping or the STOP file, once decided (the loop asks after each round).
        self.stop_request: Stop | None = None
        self._round_started = time.time()
        self._background: threading.Thread | None = None
        self._background_error: BaseException | None = None
        # A round's global adapter scored while the sites evaluate it (score_ahead).
        self._ahead: Ahead | None = None

    def score_ahead(self, server_round: int, arrays: ArrayRecord) -> None:
        """Start scoring round `server_round`'s global adapter in a thread, now: the loop calls
        this before the sites' evaluation exchange, which it does not depend on, and the
        round's `__call__` then records that score. In a deployment the exchange is mostly
        waiting on the network; in a simulation the sites' evaluation shares the cores."""
        self.wait()
        self.evaluator.lora.set_base_offsets(self.strategy.base_offsets())
        scored: dict = {}

        def score() -> None:
            try:
                scored["metrics"] = self.evaluator(arrays)
            except BaseException as err:  # raised in the run's thread by __call__ or wait()
                scored["error"] = err

        thread = threading.Thread(target=score, daemon=True,
                                  name=f"fedlora-round-{server_round}-evaluation")
        self._ahead = Ahead(server_round, arrays, thread, scored)
        thread.start()

    def _scored_ahead(self, server_round: int, arrays: ArrayRecord) -> dict[str, float] | None:
        """The metrics score_ahead computed for this round and adapter (None if it did not)."""
        ahead, self._ahead = self._ahead, None
        if ahead is None:
            return None
        ahead.thread.join()
        if "error" in ahead.scored:
            raise ahead.scored["error"]
        same = ahead.round == server_round and ahead.arrays is arrays
        return ahead.scored["metrics"] if same else None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.wait()
        scored = self._scored_ahead(server_round, arrays)
        # The evaluator reads the strategy's base offsets (exact's residual) as of this round.
        self.evaluator.lora.set_base_offsets(self.strategy.base_offsets())
        pending = self._snapshot(server_round, arrays)
        if server_round == 0:
            self._background = threading.Thread(target=self._record_in_background,
                                                args=(pending,), daemon=True,
                                                name="fedlora-round-0-evaluation")
            self._background.start()
            return None
        return MetricRecord(self._record(pending, scored))

    def wait(self, reraise: bool = True) -> None:
        """Wait for round 0's evaluation and a score_ahead still running; raise what round 0's
        raised (unless reraise=False). What score_ahead scored stays for its round's call."""
        if self._ahead is not None:
            self._ahead.thread.join()
        if self._background is not None:
            self._background.join()
            self._background = None
        error, self._background_error = self._background_error, None
        if error is not None and reraise:
            raise error

    def _select(self, server_round: int, metrics: dict[str, float],
                pending: PendingRound) -> None:
        key, min_delta = self.cfg.selection_key, self.cfg.early_stopping_min_delta
        value = metrics.get(key)
        if value is not None and improves(value, self.best.value if self.best else None, key,
                                          min_delta):
            self.best = BestRound(server_round, float(value), pending.state.adapter,
                                  pending.offsets)
        patience = self.cfg.early_stopping_patience
        if self.run.stop_requested():
            self.stop_request = Stop(StopReason.STOP_FILE,
                                     f"stopped on request ({self.run.stop_file} exists)")
        elif should_stop(server_round, self.best.round if self.best else None, patience):
            self.stop_request = Stop(StopReason.EARLY_STOPPING, (
                f"early stopping: {key} did not improve by more than {min_delta:g} for "
                f"{patience} rounds (best: round {self.best.round}, {key} {self.best.value:.4f})"))

    def _snapshot(self, server_round: int, arrays: ArrayRecord) -> PendingRound:
        stats = self.strategy.round_stats.pop(server_round, RoundStats())
        state = RunState.capture(server_round, record_to_adapter(arrays), self.strategy.rng,
                                 self.parts)
        started = self._round_started
        if server_round == 0:  # round 1 starts now, while round 0 is scored
            self._round_started = time.time()
            state = state.frozen()  # round 1 moves the parts' state meanwhile
        offsets = self.strategy.base_offsets() or {}
        return PendingRound(server_round, arrays, stats, started, state,
                            {k: v.detach().clone() for k, v in offsets.items()})

    def _record_in_background(self, pending: dict) -> None:
        try:
            self._record(pending)
        except BaseException as err:  # raised in the run's thread by wait()
            self._background_error = err

    def _record(self, pending: PendingRound, scored: dict[str, float] | None = None
                ) -> dict[str, float]:
        server_metrics = scored if scored is not None else self.evaluator(pending.arrays)
        record = pending.stats.line(
            pending.round, server_metrics,
            # Round 0: set-up and the initial evaluation. Round r: from round r-1's end (round
            # 1: from round 0's start, as the two overlap) to this round's evaluation's end.
            seconds=time.time() - pending.started)
        self.run.append_round(record)
        if self.scalars is not None:
            self.scalars.write(record)
        self._select(pending.round, server_metrics, pending)
        pending.state.best = self.best
        # After the round's line: a crash between the two repeats the round on resume,
        # and keep_rounds_through drops its first line.
        save_run_state(self.run.checkpoint_dir, pending.state)
        if pending.round > 0:  # the next round starts once this one is recorded
            self._round_started = time.time()
        return server_metrics
