from collections import OrderedDict

import pytest
import torch

from server.aggregation import weighted_average, weighted_mean_metrics


def test_weighted_average_matches_a_hand_computation():
    a = OrderedDict(w=torch.tensor([[1.0, 2.0], [3.0, 4.0]]), b=torch.tensor([0.0]))
    b = OrderedDict(w=torch.tensor([[5.0, 6.0], [7.0, 8.0]]), b=torch.tensor([10.0]))
    c = OrderedDict(w=torch.tensor([[0.0, 0.0], [0.0, 1.0]]), b=torch.tensor([-2.0]))
    # weights 10, 30, 60 -> 0.1, 0.3, 0.6
    result = weighted_average([a, b, c], [10, 30, 60])
    assert torch.allclose(result["w"], torch.tensor([[1.6, 2.0], [2.4, 3.4]]), atol=1e-6)
    assert torch.allclose(result["b"], torch.tensor([1.8]), atol=1e-6)
    assert list(result) == ["w", "b"] and result["w"].dtype == torch.float32


def test_a_single_client_is_returned_unchanged():
    state = OrderedDict(w=torch.randn(5, 3))
    assert torch.equal(weighted_average([state], [17])["w"], state["w"])


def test_zero_total_weight_is_refused():
    with pytest.raises(ValueError):
        weighted_average([OrderedDict(w=torch.ones(1))], [0])


def test_metrics_are_example_weighted_over_common_keys():
    metrics = weighted_mean_metrics([{"loss": 1.0, "acc": 0.5, "only-a": 3.0},
                                     {"loss": 3.0, "acc": 1.0}], [1, 3])
    assert metrics == pytest.approx({"loss": 2.5, "acc": 0.875})


def test_robust_rules_match_flower_and_resist_an_outlier():
    import numpy as np

    from common.flower_compat import flower_trim_mean as trim_mean
    from server.aggregation import coordinate_median, trimmed_mean

    g = torch.Generator().manual_seed(0)
    states = [OrderedDict(w=torch.randn(4, 3, generator=g)) for _ in range(6)]
    stacked = np.stack([s["w"].numpy() for s in states])
    assert np.allclose(coordinate_median(states)["w"].numpy(), np.median(stacked, axis=0))
    assert np.allclose(trimmed_mean(states, 0.2)["w"].numpy(), trim_mean(stacked, 0.2),
                       atol=1e-6)
    poisoned = states + [OrderedDict(w=torch.full((4, 3), 1e6))]
    assert coordinate_median(poisoned)["w"].abs().max() < 10
    assert trimmed_mean(poisoned, 0.2)["w"].abs().max() < 10
    assert weighted_average(poisoned, [1] * 7)["w"].abs().max() > 1e4
