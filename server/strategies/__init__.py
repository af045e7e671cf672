"""Strategies by name: `strategy = NAME` in the run config, `fedlora simulate --strategy NAME`."""

from __future__ import annotations

from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.model import LoraModel
from server.strategies.exact import LoraExact
from server.strategies.fedadam import LoraFedAdam
from server.strategies.fedavg import LoraFedAvg
from server.strategies.fedavgm import LoraFedAvgM
from server.strategies.fedprox import LoraFedProx
from server.strategies.fedyogi import LoraFedYogi
from server.strategies.ffa import LoraFFA
from server.strategies.hetlora import LoraHetLoRA
from server.strategies.median import LoraMedian
from server.strategies.trimmed_mean import LoraTrimmedMean

STRATEGIES: dict[str, type[LoraFedAvg]] = {
    "fedavg": LoraFedAvg,
    "fedprox": LoraFedProx,
    "fedadam": LoraFedAdam,
    "fedyogi": LoraFedYogi,
    "fedavgm": LoraFedAvgM,
    "ffa": LoraFFA,
    "exact": LoraExact,
    "hetlora": LoraHetLoRA,
    "median": LoraMedian,
    "trimmed-mean": LoraTrimmedMean,
}


def check_privacy_fits_strategy(cfg: FedLoraConfig) -> None:
    """Secure aggregation and client-level DP each need a strategy of a certain shape; refuse
    the combination before anything runs."""
    strategy = STRATEGIES[cfg.strategy]
    if cfg.secure_aggregation and strategy.needs_individual_updates:
        fits = ", ".join(n for n, s in STRATEGIES.items() if not s.needs_individual_updates)
        raise FedLoraError(f"strategy {cfg.strategy} needs each site's own update, and secure "
                           f"aggregation reveals only their sum: use one of {fits}, or "
                           f"secure-aggregation=false")
    if cfg.client_level_dp and not strategy.aggregate_is_mean:
        fits = ", ".join(n for n, s in STRATEGIES.items() if s.aggregate_is_mean)
        raise FedLoraError(f"client-level DP adds noise calibrated to a plain mean of the "
                           f"updates, which strategy {cfg.strategy} does not release: use one of "
                           f"{fits}")


def build_strategy(cfg: FedLoraConfig, lora: LoraModel) -> LoraFedAvg:
    check_privacy_fits_strategy(cfg)
    return STRATEGIES[cfg.strategy](cfg, reference=lora.trainable_state(),
                                    frozen=lora.frozen_lora_state())
