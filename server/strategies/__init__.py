"""Strategies by name: `strategy = NAME` in the run config, `fedlora simulate --strategy NAME`."""

from __future__ import annotations

from common.config import FedLoraConfig
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


def build_strategy(cfg: FedLoraConfig, lora: LoraModel) -> LoraFedAvg:
    return STRATEGIES[cfg.strategy](cfg, reference=lora.trainable_state(),
                                    frozen=lora.frozen_lora_state())
