"""FFA-LoRA (Sun et al., 2024): A stays at the random init every site builds from the shared
seed; only B and the head train and travel. With A fixed, mean(B) @ A == mean(B @ A): averaging
is exact, and the upload is about half of LoRA's."""

from server.strategies.fedavg import LoraFedAvg


class LoraFFA(LoraFedAvg):
    """Aggregates B and the head like FedAvg; `frozen` holds A for the error metric only."""

    name = "ffa"
