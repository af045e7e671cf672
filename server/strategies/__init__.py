"""Strategies by name: `strategy = NAME` in the run config, `fedlora simulate --strategy NAME`."""

from __future__ import annotations

from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.model import LoraModel
from common.strategy_registry import strategy_names, strategy_spec
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

# The aggregation rule of each registered strategy (common/strategy_registry.py), by its name.
STRATEGIES: dict[str, type[LoraFedAvg]] = {cls.name: cls for cls in (
    LoraFedAvg, LoraFedProx, LoraFedAdam, LoraFedYogi, LoraFedAvgM, LoraFFA, LoraExact,
    LoraHetLoRA, LoraMedian, LoraTrimmedMean)}
assert set(STRATEGIES) == set(strategy_names()), "every registered strategy has one rule"


def check_privacy_fits_strategy(cfg: FedLoraConfig) -> None:
    """Secure aggregation and client-level DP each need a strategy of a certain shape; refuse
    the combination before anything runs."""
    spec = strategy_spec(cfg.strategy)
    if cfg.secure_aggregation and not spec.sum_only:
        fits = ", ".join(strategy_names(lambda s: s.sum_only))
        raise FedLoraError(f"strategy {cfg.strategy} needs each site's own update, and secure "
                           f"aggregation reveals only their sum: use one of {fits}, or "
                           f"secure-aggregation=false")
    if cfg.client_level_dp and not spec.mean_release:
        fits = ", ".join(strategy_names(lambda s: s.mean_release))
        raise FedLoraError(f"client-level DP adds noise calibrated to a plain mean of the "
                           f"updates, which strategy {cfg.strategy} does not release: use one of "
                           f"{fits}")


# What head-mode=auto means where the strategy can use summed head statistics: the mode measured
# best on BANKING77 (docs/benchmarks.md).
AUTO_HEAD_MODE = "fit"


def resolve_head_mode(cfg: FedLoraConfig, pooling: str | None) -> str:
    """How the run makes its classification head (fit, train or fit-then-train): head-mode,
    with auto resolved (a fit mode where the head reads mean-pooled features, `pooling` being
    the resolved one, and the strategy and privacy setting can use summed statistics);
    FedLoraError when those cannot for a fit mode asked for by name."""
    if not cfg.is_classification:
        return "train"
    fits = strategy_spec(cfg.strategy).sums_head_statistics
    reason = (f"strategy {cfg.strategy} bounds what a few bad sites can do, and one site can "
              f"move a summed head statistic as far as it likes" if not fits else
              "client-level DP noise covers a site's adapter update, not its head statistics"
              if cfg.client_level_dp else "")
    if cfg.head_mode == "auto":
        if not reason and pooling != "mean":
            reason = f"the head reads pooling={pooling} features, not mean-pooled ones"
        mode = "train" if reason else AUTO_HEAD_MODE
        if mode == "train" and cfg.num_rounds == 0:
            raise FedLoraError(f"num-rounds=0 runs the head round alone, and head-mode=auto "
                               f"trains the head here ({reason})")
        return mode
    if cfg.head_mode != "train" and reason:
        raise FedLoraError(f"head-mode={cfg.head_mode} fits the head from summed statistics; "
                           f"{reason}: use head-mode=train")
    return cfg.head_mode


def build_strategy(cfg: FedLoraConfig, lora: LoraModel) -> LoraFedAvg:
    check_privacy_fits_strategy(cfg)
    # A fitted head stays as the server solved it: the sites do not send it back.
    fixed = lora.head_names() if resolve_head_mode(cfg, lora.pooling) == "fit" else []
    return STRATEGIES[cfg.strategy](cfg, reference=lora.trainable_state(),
                                    frozen=lora.frozen_lora_state(), fixed=fixed)
