"""Server optimisers (FedAdam, FedYogi, FedAvgM): the weighted average of the client adapters
is treated as a pseudo-gradient step and fed to an optimiser that keeps state across rounds.
The math is in server/aggregation.py; each subclass picks its step."""

from __future__ import annotations

from collections import OrderedDict

import torch

from server.strategies.fedavg import LoraFedAvg


class LoraServerOptimizer(LoraFedAvg):

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.optimizer_state: dict[str, dict | None] = {"m": None, "v": None}

    def apply_mean(self, server_round: int, mean) -> "OrderedDict[str, torch.Tensor]":
        return self.step(server_round, self.current, mean)

    def step(self, server_round: int, current, average) -> "OrderedDict[str, torch.Tensor]":
        raise NotImplementedError

    def state_tensors(self):
        return {k: dict(v) for k, v in self.optimizer_state.items() if v is not None}

    def load_state_tensors(self, state):
        for key in self.optimizer_state:
            if key in state:
                self.optimizer_state[key] = OrderedDict(
                    (name, tensor.double()) for name, tensor in state[key].items())
