"""HetLoRA-style zero padding (Cho et al., 2024), the mixed-rank baseline: each client's factors
are padded with zeros to the global rank and averaged; a client takes the first r rows of A and
columns of B. Like FedAvg, it averages factors, so it is not exact."""

from __future__ import annotations

from common.errors import FedLoraError
from common.lora_math import rank_of, zero_pad
from server.aggregation import weighted_average
from server.contract import TrainUpdate
from server.strategies.fedavg import LoraFedAvg


class LoraHetLoRA(LoraFedAvg):
    name = "hetlora"  # sites of different ranks send different shapes to pad: not a sum

    def check_update(self, update: TrainUpdate) -> None:
        try:
            rank = rank_of(update.state)
        except ValueError as err:
            raise FedLoraError(str(err)) from None
        if rank > self.cfg.global_lora_rank:
            raise FedLoraError(f"rank {rank} is above the global rank {self.cfg.global_lora_rank}")

    def aggregate_updates(self, server_round, updates: list[TrainUpdate]):
        padded = [zero_pad(u.state, self.cfg.global_lora_rank) for u in updates]
        return weighted_average(padded, [u.weight for u in updates])
