"""After each round: score the global adapter, append the round's line, checkpoint the round."""

from __future__ import annotations

import os
import threading
import time
from typing import Protocol, Sequence

import torch
from flwr.app import ArrayRecord, MetricRecord

from common.config import FedLoraConfig
from common.records import record_to_adapter
from server.checkpoint import Checkpoint, save_checkpoint
from server.evaluation import GlobalEvaluator
from server.federation_loop import Stop, StopReason
from server.outputs import RunDirectory
from server.round_record import RoundStats
from server.selection import improves, should_stop
from server.strategies.fedavg import LoraFedAvg
from server.tensorboard import RoundScalars


class Stateful(Protocol):
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]: ...

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None: ...


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
                 scalars: RoundScalars | None = None) -> None:
        self.run, self.evaluator, self.cfg = run, evaluator, cfg
        # Besides the strategy, what carries state from round to round (client-level DP's
        # accountant, the head round's release count, the loop's retried attempts):
        # checkpointed with every round.
        self.strategy, self.parts = strategy, list(parts)
        self.scalars = scalars  # TensorBoard, when asked for
        # The best round so far by cfg.selection_key, its adapter and base offsets (exact's
        # residual): checkpointed with every round, so a resumed run keeps them.
        self.best: tuple[int, float] | None = None
        self.best_adapter: dict[str, torch.Tensor] = {}
        self.best_offsets: dict[str, torch.Tensor] = {}
        # Early stopping or the STOP file, once decided (the loop asks after each round).
        self.stop_request: Stop | None = None
        self._round_started = time.time()
        self._background: threading.Thread | None = None
        self._background_error: BaseException | None = None

    def __call__(self, server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        self.wait()
        # The evaluator reads the strategy's base offsets (exact's residual) as of this round.
        self.evaluator.lora.set_base_offsets(self.strategy.base_offsets())
        pending = self._snapshot(server_round, arrays)
        if server_round == 0:
            self._background = threading.Thread(target=self._record_in_background,
                                                args=(pending,), daemon=True,
                                                name="fedlora-round-0-evaluation")
            self._background.start()
            return None
        return MetricRecord(self._record(pending))

    def wait(self, reraise: bool = True) -> None:
        """Wait for round 0's evaluation; raise what it raised (unless reraise=False)."""
        if self._background is not None:
            self._background.join()
            self._background = None
        error, self._background_error = self._background_error, None
        if error is not None and reraise:
            raise error

    def restore_best(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """The best round as a checkpoint saved it (resume)."""
        best = state.get("best", {})
        if "round" in best:
            self.best = (int(best["round"][0]), float(best["value"][0]))
            self.best_adapter = dict(state.get("best-adapter", {}))
            self.best_offsets = dict(state.get("best-offsets", {}))

    def _best_state(self) -> dict[str, dict[str, torch.Tensor]]:
        if self.best is None:
            return {}
        return {"best": {"round": torch.tensor([self.best[0]]),
                         "value": torch.tensor([self.best[1]], dtype=torch.float64)},
                "best-adapter": self.best_adapter, "best-offsets": self.best_offsets}

    def _select(self, server_round: int, metrics: dict[str, float], pending: dict) -> None:
        key, min_delta = self.cfg.selection_key, self.cfg.early_stopping_min_delta
        value = metrics.get(key)
        if value is not None and improves(value, self.best[1] if self.best else None, key,
                                          min_delta):
            self.best = (server_round, float(value))
            self.best_adapter = record_to_adapter(pending["arrays"])
            self.best_offsets = pending["offsets"]
        patience = self.cfg.early_stopping_patience
        if self.run.stop_requested():
            self.stop_request = Stop(StopReason.STOP_FILE,
                                     f"stopped on request ({self.run.stop_file} exists)")
        elif should_stop(server_round, self.best, patience):
            self.stop_request = Stop(StopReason.EARLY_STOPPING, (
                f"early stopping: {key} did not improve by more than {min_delta:g} for "
                f"{patience} rounds (best: round {self.best[0]}, {key} {self.best[1]:.4f})"))

    def _snapshot(self, server_round: int, arrays: ArrayRecord) -> dict:
        stats = self.strategy.round_stats.pop(server_round, RoundStats())
        state = {**self.strategy.state_tensors(),
                 **{group: tensors for part in self.parts
                    for group, tensors in part.state_tensors().items()}}
        started = self._round_started
        if server_round == 0:  # round 1 starts now, while round 0 is scored
            self._round_started = time.time()
        offsets = self.strategy.base_offsets() or {}
        return {"round": server_round, "arrays": arrays, "stats": stats, "started": started,
                "offsets": {k: v.detach().clone() for k, v in offsets.items()},
                # Round 0 is scored while round 1 moves the strategy's state: freeze a copy.
                "state": {group: {name: t.detach().clone() for name, t in tensors.items()}
                          for group, tensors in state.items()} if server_round == 0 else state,
                "rng": self.strategy.rng.getstate()}

    def _record_in_background(self, pending: dict) -> None:
        try:
            _lower_this_threads_priority()
            self._record(pending)
        except BaseException as err:  # raised in the run's thread by wait()
            self._background_error = err

    def _record(self, pending: dict) -> dict[str, float]:
        server_metrics = self.evaluator(pending["arrays"])
        record = pending["stats"].line(
            pending["round"], server_metrics,
            # Round 0: set-up and the initial evaluation. Round r: from round r-1's end (round
            # 1: from round 0's start, as the two overlap) to this round's evaluation's end.
            seconds=time.time() - pending["started"])
        self.run.append_round(record)
        if self.scalars is not None:
            self.scalars.write(record)
        self._select(pending["round"], server_metrics, pending)
        # After the round's line: a crash between the two repeats the round on resume,
        # and keep_rounds_through drops its first line.
        save_checkpoint(self.run.checkpoint_dir, Checkpoint(
            round=pending["round"], adapter=record_to_adapter(pending["arrays"]),
            strategy_state={**pending["state"], **self._best_state()}, rng_state=pending["rng"]))
        if pending["round"] > 0:  # the next round starts once this one is recorded
            self._round_started = time.time()
        return server_metrics


def _lower_this_threads_priority() -> None:
    """Round 0's evaluation yields the CPU to the sites starting up and training (in a
    simulation they share this machine): Linux gives each thread its own nice value, and the
    thread pools torch starts from this thread inherit it."""
    if hasattr(os, "setpriority"):
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
        except OSError:
            pass
