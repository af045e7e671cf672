"""Aggregation rules as pure functions on tensors; strategies only orchestrate."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import torch


def normalized_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    return [float(w) / total for w in weights]


def weighted_average(states: Sequence[Mapping[str, torch.Tensor]],
                     weights: Sequence[float]) -> "OrderedDict[str, torch.Tensor]":
    """Sum_k p_k * state_k per tensor, p_k = weight_k / sum(weights); accumulated in float64."""
    if not states:
        raise ValueError("nothing to aggregate")
    p = normalized_weights(weights)
    result: OrderedDict[str, torch.Tensor] = OrderedDict()
    for name, first in states[0].items():
        acc = torch.zeros(first.shape, dtype=torch.float64)
        for p_k, state in zip(p, states):
            acc += p_k * state[name].to(torch.float64)
        result[name] = acc.to(torch.float32)
    return result


def weighted_mean_metrics(metrics: Sequence[Mapping[str, float]],
                          weights: Sequence[float]) -> dict[str, float]:
    """Example-weighted mean of each metric present in every record."""
    if not metrics:
        return {}
    p = normalized_weights(weights)
    common = set(metrics[0]).intersection(*map(set, metrics[1:]))
    return {key: float(sum(p_k * float(m[key]) for p_k, m in zip(p, metrics)))
            for key in sorted(common)}
