"""Server optimisers (FedAdam, FedYogi, FedAvgM): the weighted average of the client adapters
is treated as a pseudo-gradient step and fed to an optimiser that keeps state across rounds.
The math is in server/aggregation.py; each subclass picks its step."""

from __future__ import annotations

from collections import OrderedDict

import torch

from server.aggregation import weighted_average
from server.contract import TrainUpdate
from server.strategies.fedavg import LoraFedAvg


class LoraServerOptimizer(LoraFedAvg):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer_state: dict[str, dict | None] = {"m": None, "v": None}

    def aggregate_updates(self, server_round: int, updates: list[TrainUpdate]
                          ) -> "OrderedDict[str, torch.Tensor]":
        average = weighted_average([u.state for u in updates], [u.num_examples for u in updates])
        return self.step(server_round, self.current, average)

    def step(self, server_round: int, current, average) -> "OrderedDict[str, torch.Tensor]":
        raise NotImplementedError

    def state_tensors(self):
        return {k: dict(v) for k, v in self.optimizer_state.items() if v is not None}

    def load_state_tensors(self, state):
        for key in self.optimizer_state:
            if key in state:
                self.optimizer_state[key] = OrderedDict(
                    (name, tensor.double()) for name, tensor in state[key].items())
