"""Each strategy's own parameters reach its rule: the server optimisers' learning rate and
moments, trim-fraction, a mixed-rank strategy's global rank (server side, through the config the
strategy is built from); proximal-mu and client-ranks (client side, through the run config the
ClientApp reads). Each value is a non-default one, so a rule that ignores its key fails here."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

import client.app as client_app
from common.config import FedLoraConfig
from common.data import load_splits, resolve_labels
from common.errors import FedLoraError
from common.lora_math import rank_of, zero_pad
from common.model import build_lora_model
from common.records import adapter_to_record, record_to_adapter
from common.strategy_registry import (
    StrategySpec,
    register_strategy,
    strategy_names,
    strategy_spec,
)
from server.aggregation import (
    fedadam_step,
    fedavgm_step,
    fedyogi_step,
    trimmed_mean,
    weighted_average,
)
from server.strategies import STRATEGIES
from tests.conftest import StaticGrid, site_message

pytestmark = pytest.mark.usefixtures("task_identity")


def _state(seed: int, rank: int = 2) -> OrderedDict:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([("m.lora_A.weight", torch.randn(rank, 6, generator=g)),
                        ("m.lora_B.weight", torch.randn(5, rank, generator=g))])


def _aggregate(strategy, server_round: int, current, states, examples):
    """One round through the strategy's own configure and aggregate; the new global."""
    nodes = list(range(1, len(states) + 1))
    messages = list(strategy.configure_train(server_round, adapter_to_record(current),
                                             ConfigRecord(), StaticGrid(nodes)))
    replies = [Message(RecordDict({"arrays": adapter_to_record(s), "metrics": MetricRecord(
        {"num-examples": n})}), reply_to=m) for m, s, n in zip(messages, states, examples)]
    arrays, _ = strategy.aggregate_train(server_round, replies)
    return record_to_adapter(arrays)


def _close(a, b) -> bool:
    return all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-6) for k in a)


ROUNDS = [([_state(1), _state(2)], [10, 30]), ([_state(3), _state(4)], [20, 20])]
OPTIMISER_KEYS = {"fedadam": dict(server_learning_rate=0.05, server_beta1=0.5,
                                  server_beta2=0.9, server_tau=0.01),
                  "fedyogi": dict(server_learning_rate=0.05, server_beta1=0.5,
                                  server_beta2=0.9, server_tau=0.01),
                  "fedavgm": dict(server_learning_rate=0.7, server_momentum=0.5)}


def _expected_optimiser(name: str, keys: dict) -> OrderedDict:
    x, m, v = _state(0), None, None
    for server_round, (states, examples) in enumerate(ROUNDS, start=1):
        average = weighted_average(states, examples)
        moments = dict(eta=keys["server_learning_rate"], beta1=keys.get("server_beta1"),
                       beta2=keys.get("server_beta2"), tau=keys.get("server_tau"))
        if name == "fedadam":
            x, m, v = fedadam_step(x, average, m, v, server_round=server_round, **moments)
        elif name == "fedyogi":
            x, m, v = fedyogi_step(x, average, m, v, **moments)
        else:
            x, m = fedavgm_step(x, average, m, lr=keys["server_learning_rate"],
                                server_momentum=keys["server_momentum"])
    return x


@pytest.mark.parametrize("name", sorted(OPTIMISER_KEYS))
def test_server_optimiser_keys_reach_the_step(name):
    keys = OPTIMISER_KEYS[name]
    cfg = FedLoraConfig(strategy=name, min_available_clients=2, min_train_clients=2, **keys)
    strategy = STRATEGIES[name](cfg, reference=_state(0))
    current = _state(0)
    for server_round, (states, examples) in enumerate(ROUNDS, start=1):
        current = _aggregate(strategy, server_round, current, states, examples)
    assert _close(current, _expected_optimiser(name, keys))
    # With any one key at its default the same rounds end elsewhere: each key moved the result.
    for key in keys:
        assert not _close(current, _expected_optimiser(name, {**keys, key: _default(name, key)}))


def _default(name: str, key: str) -> float:
    cfg = FedLoraConfig(strategy=name)
    return cfg.effective_server_lr() if key == "server_learning_rate" else getattr(cfg, key)


def test_trim_fraction_reaches_the_trimmed_mean():
    states = [_state(i) for i in range(5)]
    states[4] = OrderedDict((k, v * 4) for k, v in states[4].items())  # one far-off site
    cfg = FedLoraConfig(strategy="trimmed-mean", trim_fraction=0.2, min_available_clients=5,
                        min_train_clients=5)
    result = _aggregate(STRATEGIES["trimmed-mean"](cfg, reference=_state(0)), 1, _state(0),
                        states, [10] * 5)
    assert _close(result, trimmed_mean(states, 0.2))
    assert not _close(result, trimmed_mean(states, 0.0))


def test_the_global_rank_reaches_hetlora_padding():
    cfg = FedLoraConfig(strategy="hetlora", client_ranks="2,4", global_rank=6,
                        min_available_clients=2, min_train_clients=2)
    strategy = STRATEGIES["hetlora"](cfg, reference=_state(0, rank=6))
    states = [_state(1, rank=2), _state(2, rank=4)]
    result = _aggregate(strategy, 1, _state(0, rank=6), states, [10, 30])
    assert rank_of(result) == 6
    assert _close(result, weighted_average([zero_pad(s, 6) for s in states], [10, 30]))


@pytest.fixture
def site_train(banking_subset, monkeypatch):
    """A train message for simulated site `partition` under a run config."""
    monkeypatch.setattr(client_app, "_CACHE", None)

    def message(cfg: FedLoraConfig, partition: int = 0):
        labels = resolve_labels(cfg, load_splits(cfg))
        global_state = build_lora_model(cfg, labels).trainable_state()
        return (*site_message(cfg, labels, global_state, partition=partition), global_state)

    return message


def _distance(update, start) -> float:
    return sum(float((update[n] - start[n]).pow(2).sum()) for n in start) ** 0.5


def test_proximal_mu_reaches_the_sites_loss(banking_subset, site_train, monkeypatch):
    """The same site, seed and steps: a large proximal-mu keeps its update much nearer the
    global adapter than mu = 0 (the proximal term's gradient is mu (w - w_global))."""
    distances = {}
    for mu in (0.0, 50.0):
        monkeypatch.setattr(client_app, "_CACHE", None)
        cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=3,
                            local_steps=8, learning_rate=0.05, strategy="fedprox",
                            proximal_mu=mu)
        msg, context, start = site_train(cfg)
        reply = client_app.train(msg, context)
        distances[mu] = _distance(record_to_adapter(reply.content["arrays"]), start)
    assert distances[0.0] > 0
    assert distances[50.0] < 0.7 * distances[0.0], distances


def test_client_ranks_reach_each_site(banking_subset, site_train):
    """client-ranks gives simulated site i the rank at position i: site 1 of "2,4,8" trains
    and sends rank-4 factors, which the server pads (hetlora) to the global rank."""
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=3,
                        local_steps=1, strategy="hetlora", client_ranks="2,4,8")
    msg, context, _ = site_train(cfg, partition=1)
    reply = client_app.train(msg, context)
    update = record_to_adapter(reply.content["arrays"])
    assert rank_of({k: v for k, v in update.items() if "lora_" in k}) == 4


def test_the_registry_is_the_one_place_names_are_known():
    """An unknown name is one line naming the choices; a name registered twice is refused."""
    with pytest.raises(FedLoraError, match="strategy must be one of fedavg, .*got 'fedsgd'"):
        strategy_spec("fedsgd")
    with pytest.raises(FedLoraError, match="strategy must be one of"):
        FedLoraConfig(strategy="fedsgd")
    with pytest.raises(ValueError, match="registered twice"):
        register_strategy(StrategySpec("fedavg", "again"))
    assert list(STRATEGIES) == list(strategy_names())
