"""Aggregation rules as pure functions on tensors; strategies only orchestrate."""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import numpy as np
import torch

from common.lora_math import normalized_weights


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


# -- Server optimisers on the aggregate (Reddi et al., "Adaptive Federated Optimization";
#    Hsu et al., FedAvgM). Same formulas as Flower's FedAdam/FedYogi/FedAvgM, on tensors.

State = Mapping[str, torch.Tensor]


def _zeros_like(state: State) -> "OrderedDict[str, torch.Tensor]":
    return OrderedDict((k, torch.zeros_like(v, dtype=torch.float64)) for k, v in state.items())


def fedadam_step(current: State, average: State, m: State | None, v: State | None, *,
                 server_round: int, eta: float, beta1: float, beta2: float, tau: float):
    """x += eta_t * m / (sqrt(v) + tau) with delta = average - x; returns (x, m, v)."""
    m = m or _zeros_like(current)
    v = v or _zeros_like(current)
    new_x, new_m, new_v = OrderedDict(), OrderedDict(), OrderedDict()
    eta_t = eta * (1 - beta2 ** (server_round + 1.0)) ** 0.5 / (1 - beta1 ** (server_round + 1.0))
    for k, x in current.items():
        delta = average[k].double() - x.double()
        new_m[k] = beta1 * m[k] + (1 - beta1) * delta
        new_v[k] = beta2 * v[k] + (1 - beta2) * delta**2
        new_x[k] = (x.double() + eta_t * new_m[k] / (new_v[k].sqrt() + tau)).float()
    return new_x, new_m, new_v


def fedyogi_step(current: State, average: State, m: State | None, v: State | None, *,
                 eta: float, beta1: float, beta2: float, tau: float):
    """Yogi's additive second moment: v -= (1 - beta2) * delta^2 * sign(v - delta^2)."""
    m = m or _zeros_like(current)
    v = v or _zeros_like(current)
    new_x, new_m, new_v = OrderedDict(), OrderedDict(), OrderedDict()
    for k, x in current.items():
        delta = average[k].double() - x.double()
        new_m[k] = beta1 * m[k] + (1 - beta1) * delta
        new_v[k] = v[k] - (1 - beta2) * delta**2 * torch.sign(v[k] - delta**2)
        new_x[k] = (x.double() + eta * new_m[k] / (new_v[k].sqrt() + tau)).float()
    return new_x, new_m, new_v


def fedavgm_step(current: State, average: State, momentum: State | None, *, lr: float,
                 server_momentum: float):
    """Heavy-ball on the pseudo-gradient (x - average); returns (x, momentum)."""
    new_x, new_buf = OrderedDict(), OrderedDict()
    for k, x in current.items():
        grad = x.double() - average[k].double()
        new_buf[k] = grad if momentum is None or server_momentum == 0 else \
            server_momentum * momentum[k] + grad
        new_x[k] = (x.double() - lr * new_buf[k]).float()
    return new_x, new_buf


# -- Robust aggregation for federations that do not trust every site: unweighted, per
#    coordinate, so a few outlying updates cannot drag the result (Yin et al., 2018).

def coordinate_median(states: Sequence[State]) -> "OrderedDict[str, torch.Tensor]":
    """Per-coordinate median (the mean of the two middle values for an even count)."""
    return OrderedDict((k, torch.from_numpy(np.median(
        np.stack([s[k].double().numpy() for s in states]), axis=0)).float())
        for k in states[0])


def trimmed_mean(states: Sequence[State], trim_fraction: float
                 ) -> "OrderedDict[str, torch.Tensor]":
    """Per coordinate, drop the floor(trim_fraction * n) largest and smallest values, average
    the rest."""
    if not 0 <= trim_fraction < 0.5:
        raise ValueError("trim fraction must be in [0, 0.5)")
    n = len(states)
    cut = int(trim_fraction * n)
    result = OrderedDict()
    for k in states[0]:
        stacked = torch.stack([s[k].double() for s in states]).sort(dim=0).values
        result[k] = stacked[cut:n - cut].mean(dim=0).float()
    return result
