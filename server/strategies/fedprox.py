"""FedProx (Li et al., 2020): server side is FedAvg; each client adds (mu/2)||w - w_global||^2
to its local loss (client/training.py), which keeps skewed sites near the global adapter."""

from server.strategies.fedavg import LoraFedAvg


class LoraFedProx(LoraFedAvg):
    """Aggregates like LoraFedAvg; `proximal-mu` reaches the clients through the run config."""

    name = "fedprox"
