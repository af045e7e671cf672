"""Our server-optimiser steps against Flower's own FedAdam, FedYogi and FedAvgM."""

from collections import OrderedDict

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAdam, FedAvgM, FedYogi

from common.flower_compat import set_task_identity
from server.aggregation import fedadam_step, fedavgm_step, fedyogi_step, weighted_average
from tests.conftest import StaticGrid


def _state(seed):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict(a=torch.randn(3, 4, generator=g), b=torch.randn(5, generator=g))


def _flower_rounds(strategy, rounds):
    """Drive a Flower strategy through rounds of two clients; return its global after each."""
    set_task_identity(run_id=1, task_id=1, node_id=0)
    current, results = ArrayRecord(_state(0)), []
    for server_round, (s1, s2) in enumerate(rounds, start=1):
        messages = list(strategy.configure_train(server_round, current, ConfigRecord(),
                                                 StaticGrid([1, 2])))
        replies = [Message(RecordDict({"arrays": ArrayRecord(s), "metrics": MetricRecord(
            {"num-examples": n})}), reply_to=m) for m, s, n in zip(messages, (s1, s2), (10, 30))]
        current, _ = strategy.aggregate_train(server_round, replies)
        results.append(current.to_torch_state_dict())
    return results


ROUNDS = [(_state(1), _state(2)), (_state(3), _state(4)), (_state(5), _state(6))]


@pytest.mark.parametrize("name", ["fedadam", "fedyogi", "fedavgm"])
def test_server_optimisers_match_flower(name):
    flower = {"fedadam": FedAdam(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
              "fedyogi": FedYogi(eta=0.1, beta_1=0.9, beta_2=0.99, tau=1e-3),
              "fedavgm": FedAvgM(server_learning_rate=0.7, server_momentum=0.9)}[name]
    expected = _flower_rounds(flower, ROUNDS)
    x, m, v = _state(0), None, None
    for server_round, ((s1, s2), reference) in enumerate(zip(ROUNDS, expected), start=1):
        average = weighted_average([s1, s2], [10, 30])
        if name == "fedadam":
            x, m, v = fedadam_step(x, average, m, v, server_round=server_round, eta=0.1,
                                   beta1=0.9, beta2=0.99, tau=1e-3)
        elif name == "fedyogi":
            x, m, v = fedyogi_step(x, average, m, v, eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3)
        else:
            x, m = fedavgm_step(x, average, m, lr=0.7, server_momentum=0.9)
        for k in x:
            assert torch.allclose(x[k], reference[k].float(), rtol=1e-4, atol=1e-5), (name, k)
    assert not torch.allclose(x["a"], _state(0)["a"])
