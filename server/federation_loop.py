"""The federation loop: the one place that owns a run's rounds.

Round 0 scores the initial adapter (after the head round, if any); each later round runs its
training exchange (retried up to round-retries times when too few usable replies came back),
takes the new global adapter, lets the head round refit it, asks the sites to evaluate it and
scores it on the server. The strategy only configures and aggregates; how replies travel
(plain, client-level DP, SecAgg+) is the `exchange` chosen when the run is built; what ends a
run early is a `Stop` with its reason, asked of the parts that can decide it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid

from common.config import FedLoraConfig
from common.errors import PRIVACY_BUDGET_REACHED, FedLoraError
from server.round_record import RoundStats
from server.strategies.fedavg import LoraFedAvg


class StopReason(enum.Enum):
    PRIVACY_BUDGET = "privacy-budget"  # sites reached dp-target-epsilon and train no more
    CLIENT_DP_BUDGET = "client-dp-budget"  # one more release would exceed its target epsilon
    STOP_FILE = "stop-requested"  # the run directory's STOP file
    EARLY_STOPPING = "early-stopping"  # the selection metric stopped improving


@dataclass(frozen=True)
class Stop:
    reason: StopReason
    message: str  # the sentence the log and summary.json show


# (grid, server round, global adapter, the sites' config, timeout) -> (new global or None, the
# round's training metrics or None): a round's training exchange.
Exchange = Callable[[Grid, int, ArrayRecord, ConfigRecord, float],
                    tuple[ArrayRecord | None, MetricRecord | None]]
# (grid, server round, global adapter, the sites' config, timeout) -> the global adapter to use
Refine = Callable[[Grid, int, ArrayRecord, ConfigRecord, float], ArrayRecord]
EvaluateFn = Callable[[int, ArrayRecord], MetricRecord | None]


def plain_exchange(strategy: LoraFedAvg) -> Exchange:
    """A round's training exchange without privacy machinery: configure, send, aggregate."""
    def exchange(grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                 timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = grid.send_and_receive(
            messages=strategy.configure_train(server_round, arrays, config, grid),
            timeout=timeout)
        return strategy.aggregate_train(server_round, replies)
    return exchange


def privacy_budget_stop(round_stats: RoundStats, cfg: FedLoraConfig) -> Stop | None:
    """Sites left out because they reached dp-target-epsilon: retrying cannot help, they will
    refuse again; the run is over."""
    spent = [d for d in round_stats.dropped if PRIVACY_BUDGET_REACHED in d["reason"]]
    if not spent:
        return None
    return Stop(StopReason.PRIVACY_BUDGET, f"{len(spent)} site(s) reached dp-target-epsilon "
                                           f"({cfg.dp_target_epsilon:g}) and train no more")


class FederationLoop:
    """Runs rounds `first_round`..num-rounds of a run (round 0 only when first_round is 0)."""

    def __init__(self, strategy: LoraFedAvg, cfg: FedLoraConfig, exchange: Exchange,
                 refine: Refine | None = None) -> None:
        self.strategy, self.cfg, self.exchange, self.refine = strategy, cfg, exchange, refine
        # Each retried round is one more release of every site's DP-SGD: counted for epsilon,
        # and checkpointed so that a resumed run counts on.
        self.retried_attempts = 0
        self.stop: Stop | None = None

    def run(self, grid: Grid, initial: ArrayRecord, train_config: ConfigRecord,
            evaluate_config: ConfigRecord, evaluate_fn: EvaluateFn, first_round: int = 0,
            stop_sources: Sequence[Callable[[], Stop | None]] = (),
            score_ahead: Callable[[int, ArrayRecord], None] | None = None) -> ArrayRecord:
        """The global adapter the run ends with; `stop_sources` are asked, after each training
        exchange and each evaluation, whether the run must end. `score_ahead`, if given, is
        told a round's global adapter before the sites evaluate it (the server may score it
        meanwhile; evaluate_fn records the round after the exchange)."""
        strategy, timeout, arrays = self.strategy, self.cfg.round_timeout, initial
        if first_round == 0:
            if self.refine is not None:
                arrays = self.refine(grid, 0, arrays, train_config, timeout)
            evaluate_fn(0, arrays)
        for server_round in range(max(first_round, 1), self.cfg.num_rounds + 1):
            log(INFO, "[ROUND %s/%s]", server_round, self.cfg.num_rounds)
            new_arrays = self._train(grid, server_round, arrays, train_config, stop_sources)
            if self.stop is not None:
                log(WARNING, "round %s: %s; the run ends with round %s's adapter",
                    server_round, self.stop.message, server_round - 1)
                break
            if new_arrays is not None:
                arrays = new_arrays
                if self.refine is not None:
                    arrays = self.refine(grid, server_round, arrays, train_config, timeout)
            if score_ahead is not None:
                score_ahead(server_round, arrays)
            replies = grid.send_and_receive(
                messages=strategy.configure_evaluate(server_round, arrays, evaluate_config,
                                                     grid), timeout=timeout)
            strategy.aggregate_evaluate(server_round, replies)
            evaluate_fn(server_round, arrays)
            if self._stopped(stop_sources):
                log(WARNING, "round %s: %s", server_round, self.stop.message)
                break
        return arrays

    def _train(self, grid: Grid, server_round: int, arrays: ArrayRecord,
               train_config: ConfigRecord, stop_sources) -> ArrayRecord | None:
        """The round's training exchange, retried while too few usable replies come back."""
        needed = self.strategy.min_train_nodes
        for attempt in range(self.cfg.round_retries + 1):
            self.retried_attempts += attempt > 0
            train_config["train-releases"] = server_round + self.retried_attempts
            started = time.perf_counter()
            new_arrays, _ = self.exchange(grid, server_round, arrays, train_config,
                                          self.cfg.round_timeout)
            stats = self.strategy.round_stats[server_round]
            stats.train_exchange_seconds = time.perf_counter() - started
            usable = stats.aggregated
            # A stop asked for meanwhile (round 0's evaluation runs beside round 1) ends the
            # run before this round's adapter is taken.
            stopped = self._stopped(stop_sources)
            if usable >= needed or stopped:
                return new_arrays
            self.stop = privacy_budget_stop(stats, self.cfg)
            if self.stop is not None:
                return new_arrays
            log(WARNING, "round %s: %s usable training replies, %s needed (attempt %s of %s)",
                server_round, usable, needed, attempt + 1, self.cfg.round_retries + 1)
        raise FedLoraError(
            f"round {server_round}: only {usable} usable training replies, at least {needed} "
            f"needed, after {self.cfg.round_retries + 1} attempts; the run stopped with round "
            f"{server_round - 1} checkpointed (resume it with fedlora simulate --resume, or "
            f"resume=true)")

    def _stopped(self, sources) -> bool:
        """Whether the run must end: the first stop any source gives is kept."""
        for source in sources:
            if self.stop is not None:
                break
            self.stop = source()
        return self.stop is not None

    # -- checkpoints ----------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"run": {"retried-attempts": torch.tensor([self.retried_attempts])}}

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        self.retried_attempts = int(state.get("run", {}).get("retried-attempts",
                                                             torch.tensor([0]))[0])
