from collections import OrderedDict

import pytest
import torch

from common.lora_math import (
    exact_mean_deltas,
    factorize,
    lora_deltas,
    lora_modules,
    rank_of,
    relative_error,
    truncate,
    zero_pad,
)
from server.aggregation import weighted_average


def _adapter(rank, seed, modules=("q", "v"), d_in=12, d_out=10):
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for m in modules:
        state[f"layer.{m}.lora_A.default.weight"] = torch.randn(rank, d_in, generator=g)
        state[f"layer.{m}.lora_B.default.weight"] = torch.randn(d_out, rank, generator=g)
    state["classifier.modules_to_save.default.bias"] = torch.randn(3, generator=g)
    return state


def test_pairs_and_rank():
    state = _adapter(4, 0)
    assert list(lora_modules(state)) == ["layer.q", "layer.v"]
    assert rank_of(state) == 4


def test_factor_averaging_is_not_update_averaging_and_the_exact_mean_is():
    states, weights = [_adapter(4, s) for s in range(3)], [1, 2, 5]
    exact = exact_mean_deltas(states, [2.0] * 3, weights)
    # Reference: the weighted mean of each client's s * B @ A, written out.
    p = [w / 8 for w in weights]
    for prefix in exact:
        reference = sum(p_k * 2.0 * s[f"{prefix}.lora_B.default.weight"].double()
                        @ s[f"{prefix}.lora_A.default.weight"].double()
                        for p_k, s in zip(p, states))
        assert torch.allclose(exact[prefix], reference)
    averaged = lora_deltas(weighted_average(states, weights), 2.0)
    assert relative_error(averaged, exact) > 0.3
    assert relative_error(exact, exact) == 0


def test_factorize_is_exact_up_to_rank_and_keeps_what_it_truncates():
    delta = lora_deltas(_adapter(6, 1), 0.5)["layer.q"]  # rank 6
    b, a, residual = factorize(delta, rank=6, scaling=0.5)
    assert torch.allclose(0.5 * b @ a, delta, atol=1e-10) and residual.abs().max() < 1e-10
    b, a, residual = factorize(delta, rank=2, scaling=0.5)
    assert b.shape == (10, 2) and a.shape == (2, 12)
    assert torch.allclose(0.5 * b @ a + residual, delta, atol=1e-12)
    # Eckart-Young: no rank-2 matrix is closer than the truncated SVD.
    sigma = torch.linalg.svdvals(delta)
    assert torch.isclose(residual.norm(), sigma[2:].norm())


def test_zero_pad_and_truncate_keep_the_product():
    state = _adapter(3, 2)
    padded = zero_pad(state, 8)
    assert rank_of(padded) == 8
    assert all(torch.allclose(lora_deltas(padded, 1.0)[k], v)
               for k, v in lora_deltas(state, 1.0).items())
    assert all(torch.equal(truncate(padded, 3)[k], state[k]) for k in state)
    with pytest.raises(ValueError):
        zero_pad(state, 2)
