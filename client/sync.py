"""Bring a received global adapter into the local model, as the round's strategy requires."""

from __future__ import annotations

from common.config import FedLoraConfig
from common.lora_math import lora_modules, rank_of, refactor_to_rank, truncate
from common.model import LoraModel
from common.records import RESIDUAL_KEY, check_adapter_matches, record_to_adapter
from common.strategy_registry import strategy_spec


def load_global(lora: LoraModel, content, cfg: FedLoraConfig) -> None:
    """fedavg & co.: load as is. hetlora: keep the first r ranks. exact: re-factorise the global
    product to the local rank and fold what it cannot hold, plus the server's residual, into the
    frozen base weights, so the local model equals the global one exactly."""
    state = record_to_adapter(content["arrays"])
    local = lora.trainable_state()
    mixed_ranks = strategy_spec(cfg.strategy).mixed_ranks
    if mixed_ranks is not None and lora_modules(local):
        local_rank = rank_of(local)
        if mixed_ranks == "truncate":
            state = truncate(state, local_rank)
        else:
            state, leftovers = refactor_to_rank(state, local_rank, cfg.lora_scaling,
                                                extra_a=local)
            residual = record_to_adapter(content[RESIDUAL_KEY]) if RESIDUAL_KEY in content \
                else {}
            lora.set_base_offsets({prefix: leftover + residual.get(prefix, 0)
                                   for prefix, leftover in leftovers.items()})
    check_adapter_matches(state, local, sender="the server")
    lora.load_trainable_state(state)
