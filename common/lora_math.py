"""LoRA algebra as pure functions on tensors: factor pairs, products, re-factorisation, padding.

A LoRA module adds s * B @ A to a frozen weight (A: r x in, B: out x r, s = alpha / r).
Averaging A and B separately is not averaging the updates: mean(B) @ mean(A) != mean(B @ A).
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Mapping, Sequence

import torch

LORA_A, LORA_B = ".lora_A.", ".lora_B."


def normalized_weights(weights: Sequence[float]) -> list[float]:
    total = float(sum(weights))
    if total <= 0:
        raise ValueError("aggregation weights must sum to a positive number")
    return [float(w) / total for w in weights]


def lora_modules(state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, tuple[str, str]]":
    """Module prefix -> (name of A, name of B), for every LoRA pair in an adapter state."""
    pairs: OrderedDict[str, tuple[str, str]] = OrderedDict()
    for name in state:
        if LORA_A in name:
            prefix = name.split(LORA_A)[0]
            b_name = name.replace(LORA_A, LORA_B)
            if b_name not in state:
                raise ValueError(f"LoRA factor {name!r} has no matching B factor")
            pairs[prefix] = (name, b_name)
    return pairs


def rank_of(state: Mapping[str, torch.Tensor]) -> int:
    ranks = {state[a].shape[0] for a, _ in lora_modules(state).values()}
    if len(ranks) != 1:
        raise ValueError(f"adapter has mixed ranks across modules: {sorted(ranks)}")
    return ranks.pop()


def lora_deltas(state: Mapping[str, torch.Tensor], scaling: float
                ) -> "OrderedDict[str, torch.Tensor]":
    """Module prefix -> s * B @ A (float64)."""
    return OrderedDict((prefix, scaling * state[b].double() @ state[a].double())
                       for prefix, (a, b) in lora_modules(state).items())


def exact_mean_deltas(states: Sequence[Mapping[str, torch.Tensor]], scalings: Sequence[float],
                      weights: Sequence[float]) -> "OrderedDict[str, torch.Tensor]":
    """Module prefix -> sum_k p_k s_k B_k A_k: the mean of the clients' updates (any ranks)."""
    p = normalized_weights(weights)
    result: OrderedDict[str, torch.Tensor] = OrderedDict()
    for p_k, state, s_k in zip(p, states, scalings):
        for prefix, delta in lora_deltas(state, s_k).items():
            result[prefix] = result.get(prefix, 0) + p_k * delta
    return result


def relative_error(applied: Mapping[str, torch.Tensor],
                   target: Mapping[str, torch.Tensor]) -> float:
    """||applied - target||_F / ||target||_F over all modules together."""
    num = sum(float((applied[k].double() - target[k].double()).pow(2).sum()) for k in target)
    den = sum(float(target[k].double().pow(2).sum()) for k in target)
    return (num / den) ** 0.5 if den > 0 else 0.0


def factorize(delta: torch.Tensor, rank: int, scaling: float,
              filler_a: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Best rank-r factors (B, A) with s * B @ A ~= delta, and the residual it leaves.

    Truncated SVD (Eckart-Young); the singular values are split evenly between the factors so
    neither dominates the next round's gradients. Directions the delta does not use (zero
    singular values, e.g. the all-zero first round) get A rows from `filler_a` and zero B
    columns: the product is unchanged, and B still receives gradients there."""
    u, sigma, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    used = int((sigma > sigma.max() * 1e-10).sum()) if sigma.numel() and sigma.max() > 0 else 0
    r = min(rank, used)
    root = torch.sqrt(sigma[:r] / scaling)
    b = torch.zeros(delta.shape[0], rank, dtype=torch.float64)
    a = torch.zeros(rank, delta.shape[1], dtype=torch.float64)
    b[:, :r] = u[:, :r] * root
    a[:r] = root[:, None] * vh[:r]
    if filler_a is not None and r < rank:
        a[r:] = filler_a[r:rank].double()
    residual = delta.double() - scaling * b @ a
    return b, a, residual


def zero_pad(state: Mapping[str, torch.Tensor], rank: int) -> "OrderedDict[str, torch.Tensor]":
    """HetLoRA-style: pad A with zero rows and B with zero columns up to `rank`."""
    padded = OrderedDict(state)
    for a_name, b_name in lora_modules(state).values():
        a, b = state[a_name], state[b_name]
        extra = rank - a.shape[0]
        if extra < 0:
            raise ValueError(f"cannot pad rank {a.shape[0]} down to {rank}")
        padded[a_name] = torch.cat([a, a.new_zeros(extra, a.shape[1])], dim=0)
        padded[b_name] = torch.cat([b, b.new_zeros(b.shape[0], extra)], dim=1)
    return padded


def truncate(state: Mapping[str, torch.Tensor], rank: int) -> "OrderedDict[str, torch.Tensor]":
    """Keep the first `rank` rows of A and columns of B (the inverse of zero_pad)."""
    cut = OrderedDict(state)
    for a_name, b_name in lora_modules(state).values():
        cut[a_name], cut[b_name] = state[a_name][:rank], state[b_name][:, :rank]
    return cut


def refactor_to_rank(state: Mapping[str, torch.Tensor], rank: int, scaling: float,
                     extra_a: Mapping[str, torch.Tensor] | None = None):
    """Re-express an adapter at another rank: per module, the best rank-r factors of its
    product, and the leftover product they cannot hold (zero when rank >= the product's rank).

    Returns (state at `rank`, {module prefix: leftover}). Unused directions take their A rows
    from the adapter's own A, then from `extra_a` (the receiver's own A) beyond its rank."""
    result, leftovers = OrderedDict(state), OrderedDict()
    for prefix, (a_name, b_name) in lora_modules(state).items():
        a, b = state[a_name].double(), state[b_name].double()
        filler = a[:rank]
        if rank > a.shape[0]:
            more = (extra_a[a_name][a.shape[0]:rank].double() if extra_a is not None
                    else torch.zeros(rank - a.shape[0], a.shape[1], dtype=torch.float64))
            filler = torch.cat([filler, more])
        product = scaling * b @ a
        new_b, new_a, _ = factorize(product, rank, scaling, filler_a=filler)
        result[a_name], result[b_name] = new_a.float(), new_b.float()
        # The leftover is measured against the float32 factors that are actually used.
        leftovers[prefix] = product - scaling * result[b_name].double() @ result[a_name].double()
    return result, leftovers
