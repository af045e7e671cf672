"""LoRA-aware aggregation on random factors: how far each strategy's applied update is from
the exact mean of the clients' updates, and that `exact` keeps every client in sync."""

from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

from client.sync import load_global
from common.config import FedLoraConfig
from common.lora_math import lora_modules
from common.model import build_lora_model
from common.records import adapter_to_record, record_to_adapter
from server.strategies import STRATEGIES
from tests.conftest import StaticGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def _factors(rank, seed, with_a=True):
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for m in ("q", "v"):
        if with_a:
            state[f"l.{m}.lora_A.default.weight"] = torch.randn(rank, 16, generator=g)
        state[f"l.{m}.lora_B.default.weight"] = torch.randn(12, rank, generator=g)
    state["head.modules_to_save.default.weight"] = torch.randn(3, 12, generator=g)
    return state


def _one_round(strategy, global_state, client_states, weights=(10, 20, 30)):
    nodes = list(range(1, len(client_states) + 1))
    messages = strategy.configure_train(1, adapter_to_record(global_state), ConfigRecord(),
                                        StaticGrid(nodes))
    replies = [Message(RecordDict({"arrays": adapter_to_record(state),
                                   "metrics": MetricRecord({"num-examples": n})}), reply_to=m)
               for m, state, n in zip(messages, client_states, weights)]
    arrays, _ = strategy.aggregate_train(1, replies)
    return record_to_adapter(arrays), strategy.round_stats[1]


def _cfg(strategy, **kw):
    n = kw.pop("n", 3)
    return FedLoraConfig(strategy=strategy, min_available_clients=n, min_train_clients=n, **kw)


def test_exact_is_exact_with_mixed_ranks():
    cfg = _cfg("exact", client_ranks="2,4,8", global_rank=4)
    strategy = STRATEGIES["exact"](cfg, _factors(4, 0))
    _, stats = _one_round(strategy, _factors(4, 0), [_factors(r, s) for s, r in
                                                       enumerate((2, 4, 8), start=1)])
    assert stats.agg_rel_error < 1e-5
    assert strategy.residual and all(r.abs().max() > 0 for r in strategy.residual.values())


def test_factor_averaging_is_not_exact():
    strategy = STRATEGIES["fedavg"](_cfg("fedavg", lora_r=4), _factors(4, 0))
    _, stats = _one_round(strategy, _factors(4, 0), [_factors(4, s) for s in (1, 2, 3)])
    assert stats.agg_rel_error > 0.2
    het = STRATEGIES["hetlora"](_cfg("hetlora", client_ranks="2,4,8", global_rank=8),
                                _factors(8, 0))
    _, stats = _one_round(het, _factors(8, 0), [_factors(r, s) for s, r in
                                                enumerate((2, 4, 8), start=1)])
    assert stats.agg_rel_error > 0.2


def test_ffa_sends_no_a_and_is_exact():
    frozen = {k: v for k, v in _factors(4, 0).items() if ".lora_A." in k}
    trainable = _factors(4, 0, with_a=False)
    strategy = STRATEGIES["ffa"](_cfg("ffa", lora_r=4), trainable, frozen=frozen)
    new, stats = _one_round(strategy, trainable, [_factors(4, s, with_a=False) for s in (1, 2, 3)])
    assert not any(".lora_A." in name for name in new)
    assert stats.agg_rel_error < 1e-5
    # Half the upload of LoRA factors for the same rank (A and B are the same size here).
    full = adapter_to_record({k: v for k, v in _factors(4, 1).items() if "head" not in k})
    sent = adapter_to_record({k: v for k, v in _factors(4, 1, False).items() if "head" not in k})
    assert sum(len(a.data) for a in sent.values()) < 0.6 * sum(len(a.data) for a in full.values())


def _effective(lora):
    """Each adapted weight as the model computes with it: base + s * B @ A."""
    params = dict(lora.model.named_parameters())
    out = {}
    for prefix, (a, b) in lora_modules(lora.trainable_state()).items():
        module = lora.model.get_submodule(prefix)
        out[prefix] = (module.base_layer.weight.double()
                       + module.scaling["default"] * params[b].double() @ params[a].double())
    return out


@pytest.mark.parametrize("late_rank", [4, 2])
def test_a_client_joining_at_round_3_under_exact_has_the_global_weights(tiny_llama_dir,
                                                                          late_rank):
    cfg = FedLoraConfig(model=str(tiny_llama_dir), task="causal-lm", strategy="exact",
                        client_ranks=f"4,4,{late_rank}", global_rank=4, min_available_clients=2,
                        min_train_clients=2)
    server = build_lora_model(cfg)
    strategy = STRATEGIES["exact"](cfg, server.trainable_state())
    clients = [build_lora_model(cfg, rank=r) for r in (4, 4, late_rank)]
    global_state = server.trainable_state()
    g = torch.Generator().manual_seed(0)
    for server_round, present in ((1, [0, 1]), (2, [0, 1]), (3, [0, 1, 2])):
        strategy.min_available_nodes = strategy.min_train_nodes = len(present)
        messages = strategy.configure_train(server_round, adapter_to_record(global_state),
                                            ConfigRecord(), StaticGrid(present))
        replies = []
        for message, k in zip(messages, present):
            load_global(clients[k], message.content, cfg)
            if server_round == 3:  # everyone starts round 3 from the same weights
                ref = _effective(clients[0])
                assert all(torch.allclose(_effective(clients[k])[p], ref[p], atol=1e-5)
                           for p in ref)
            trained = OrderedDict((n, t + 0.05 * torch.randn(t.shape, generator=g))
                                  for n, t in clients[k].trainable_state().items())
            replies.append(Message(RecordDict({"arrays": adapter_to_record(trained),
                                               "metrics": MetricRecord({"num-examples": 5})}),
                                   reply_to=message))
        arrays, _ = strategy.aggregate_train(server_round, replies)
        assert strategy.round_stats[server_round].agg_rel_error < 1e-5
        global_state = record_to_adapter(arrays)
    # ... and ends round 3 with the same effective weights as the clients there from round 1.
    strategy.min_available_nodes = strategy.min_evaluate_nodes = 1
    [message] = list(strategy.configure_evaluate(3, adapter_to_record(global_state),
                                                 ConfigRecord(), StaticGrid([0])))
    after = []
    for client in clients:
        load_global(client, message.content, cfg)
        after.append(_effective(client))
    server.load_trainable_state(global_state)
    server.set_base_offsets(strategy.residual)
    for prefix, weight in _effective(server).items():
        for client_weights in after:
            assert torch.allclose(client_weights[prefix], weight, atol=1e-5)
