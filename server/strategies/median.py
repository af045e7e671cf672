"""Coordinate-wise median of the client adapters (robust to a minority of bad sites)."""

from server.aggregation import coordinate_median
from server.strategies.fedavg import LoraFedAvg


class LoraMedian(LoraFedAvg):
    name = "median"  # a median is not a sum: no secure aggregation

    def aggregate_updates(self, server_round, updates):
        return coordinate_median([u.state for u in updates])
