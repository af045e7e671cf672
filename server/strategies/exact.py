"""Exact aggregation: the applied global update equals the weighted mean of the clients' updates.

Each round the server forms the exact mean D = sum_k p_k (s B_k A_k + L_k) per adapted weight
(L_k: what client k could not hold at its own rank, see below), stores its best rank-R
factorisation as the global adapter, and folds what the truncation leaves into a dense residual
that every client adds to its frozen base weights (the FedEx-LoRA idea, with an SVD instead of
factor averaging, so the residual is as small as a rank-R adapter allows). Clients of any rank:
a client re-factorises the global product to its rank and folds the leftover L_k into its base
too, so every client starts each round from exactly the global weights, including one that
missed rounds (the residual sent is cumulative).

Cost: besides the adapter, every client downloads the residual, one dense float32 matrix per
adapted weight (all-MiniLM-L6-v2, query+value: 12 x 384 x 384 x 4 B = 7.1 MB a round, against
0.42 MB for the adapter). Uploads are the same as FedAvg's. It needs each client's own product
B_k A_k, so secure aggregation (which only reveals sums) cannot be combined with it.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from flwr.app import ArrayRecord

from common.lora_math import (
    factorize,
    lora_deltas,
    lora_modules,
    normalized_weights,
    rank_of,
    refactor_to_rank,
)
from common.records import RESIDUAL_KEY, adapter_to_record
from server.aggregation import weighted_average
from server.contract import TrainUpdate
from server.strategies.fedavg import LoraFedAvg


class LoraExact(LoraFedAvg):
    name = "exact"  # each site's own product B_k A_k, not just the sums

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.residual: OrderedDict[str, torch.Tensor] = OrderedDict()  # cumulative, float64
        self._round_residual: dict[str, torch.Tensor] = {}
        self._target: dict[str, torch.Tensor] = {}

    def residual_record(self) -> ArrayRecord:
        # Always float32: a rounded residual would break the clients' agreement on weights.
        return adapter_to_record(self.residual, "float32")

    def attach(self, messages) -> None:
        if messages:  # Flower's FedAvg shares one RecordDict between the round's messages
            messages[0].content[RESIDUAL_KEY] = self.residual_record()

    def adjust_target(self, target, updates: list[TrainUpdate], weights):
        """Add each client's leftover L_k: the part of the global it could not hold."""
        leftovers_by_rank = {}
        for p_k, update in zip(normalized_weights(weights), updates):
            rank = rank_of(update.state)
            if rank not in leftovers_by_rank:
                leftovers_by_rank[rank] = refactor_to_rank(self.current, rank, self.scaling)[1]
            for prefix, leftover in leftovers_by_rank[rank].items():
                target[prefix] = target[prefix] + p_k * leftover
        self._target = target
        return target

    def aggregate_updates(self, server_round, updates: list[TrainUpdate]):
        new = weighted_average([{k: v for k, v in u.state.items() if ".lora_" not in k}
                                for u in updates], [u.weight for u in updates])
        rank = self.cfg.global_lora_rank
        for prefix, (a_name, b_name) in lora_modules(self.current).items():
            b, a, _ = factorize(self._target[prefix], rank, self.scaling,
                                filler_a=self.current[a_name])
            new[a_name], new[b_name] = a.float(), b.float()
            left = self._target[prefix] - self.scaling * new[b_name].double() @ new[a_name].double()
            self._round_residual[prefix] = left
            self.residual[prefix] = self.residual.get(prefix, 0) + left
        return OrderedDict((k, new[k]) for k in self.reference)

    def base_offsets(self):
        return self.residual

    def state_tensors(self):
        return {"residual": dict(self.residual)}

    def load_state_tensors(self, state):
        self.residual = OrderedDict((k, v.double()) for k, v in state.get("residual", {}).items())

    def applied_deltas(self, new_state):
        applied = lora_deltas(new_state, self.scaling)
        return {k: v + self._round_residual[k] for k, v in applied.items()}
