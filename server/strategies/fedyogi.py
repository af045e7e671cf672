"""FedYogi (Reddi et al., 2021): Adam with Yogi's additive second-moment update."""

from server.aggregation import fedyogi_step
from server.strategies.fedopt import LoraServerOptimizer


class LoraFedYogi(LoraServerOptimizer):
    name = "fedyogi"

    def step(self, server_round, current, average):
        cfg, state = self.cfg, self.optimizer_state
        new, state["m"], state["v"] = fedyogi_step(
            current, average, state["m"], state["v"], eta=cfg.effective_server_lr(),
            beta1=cfg.server_beta1, beta2=cfg.server_beta2, tau=cfg.server_tau)
        return new
