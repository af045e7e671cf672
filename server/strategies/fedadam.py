"""FedAdam (Reddi et al., 2021): Adam on the server, over the averaged adapter delta."""

from server.aggregation import fedadam_step
from server.strategies.fedopt import LoraServerOptimizer


class LoraFedAdam(LoraServerOptimizer):
    name = "fedadam"

    def step(self, server_round, current, average):
        cfg, state = self.cfg, self.optimizer_state
        new, state["m"], state["v"] = fedadam_step(
            current, average, state["m"], state["v"], server_round=server_round,
            eta=cfg.effective_server_lr(), beta1=cfg.server_beta1, beta2=cfg.server_beta2,
            tau=cfg.server_tau)
        return new
