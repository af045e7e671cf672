"""Coordinate-wise trimmed mean: drop the `trim-fraction` largest and smallest values of every
coordinate across clients, average the rest."""

from server.aggregation import trimmed_mean
from server.strategies.fedavg import LoraFedAvg


class LoraTrimmedMean(LoraFedAvg):
    name = "trimmed-mean"  # sorting needs each client's values

    def aggregate_updates(self, server_round, updates):
        return trimmed_mean([u.state for u in updates], self.cfg.trim_fraction)
