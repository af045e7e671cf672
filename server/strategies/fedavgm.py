"""FedAvgM (Hsu et al., 2019): server-side momentum on the averaged adapter delta."""

from server.aggregation import fedavgm_step
from server.strategies.fedopt import LoraServerOptimizer


class LoraFedAvgM(LoraServerOptimizer):
    name = "fedavgm"

    def step(self, server_round, current, average):
        new, self.optimizer_state["m"] = fedavgm_step(
            current, average, self.optimizer_state["m"], lr=self.cfg.effective_server_lr(),
            server_momentum=self.cfg.server_momentum)
        return new
