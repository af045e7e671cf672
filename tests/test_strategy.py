"""LoraFedAvg on hand-made messages: the contract check, the averaging, the byte counts."""

from collections import OrderedDict

import pytest
import torch
from flwr.app import ConfigRecord, Error, Message, MetricRecord, RecordDict

from common.config import FedLoraConfig
from common.records import adapter_to_record, message_bytes, record_to_adapter
from server.aggregation import weighted_average
from server.strategies import STRATEGIES
from server.strategies.fedavg import LoraFedAvg
from tests.conftest import StaticGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def _state(value, shape_b=(4, 2)):
    return OrderedDict(a=torch.full((2, 3), float(value)), b=torch.full(shape_b, float(value)))


def _reply(instruction, state, num_examples, dtype="float32"):
    content = RecordDict({"arrays": adapter_to_record(state, dtype),
                          "metrics": MetricRecord({"num-examples": num_examples,
                                                   "train-loss": float(num_examples)})})
    return Message(content, reply_to=instruction)


def test_bad_replies_are_dropped_and_the_rest_averaged():
    strategy = LoraFedAvg(FedLoraConfig(min_available_clients=6, min_train_clients=2), _state(0))
    messages = list(strategy.configure_train(1, adapter_to_record(_state(0)), ConfigRecord(),
                                             StaticGrid([1, 2, 3, 4, 5, 6])))
    assert strategy.round_stats[1].clients["train-clients-sampled"] == 6
    assert strategy.round_stats[1].bytes_down == message_bytes(messages)
    assert message_bytes(messages) > 6 * 4 * sum(t.numel() for t in _state(0).values())
    by_node = {m.metadata.dst_node_id: m for m in messages}
    nan_state = _state(1)
    nan_state["a"][0, 0] = float("nan")
    replies = [
        _reply(by_node[1], _state(1), 10),
        _reply(by_node[2], _state(4), 30, dtype="float16"),
        _reply(by_node[3], _state(9, shape_b=(4, 3)), 10),  # wrong shape
        _reply(by_node[4], nan_state, 10),  # non-finite values
        _reply(by_node[5], _state(9), 0),  # no examples to weigh it by
        Message(Error(code=0, reason="out of memory"), reply_to=by_node[6]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    result = record_to_adapter(arrays)
    expected = weighted_average([_state(1), _state(4)], [10, 30])
    assert all(torch.allclose(result[n], expected[n]) for n in expected)
    assert torch.allclose(result["a"], torch.full((2, 3), 3.25))
    assert metrics["num-examples"] == 40 and metrics["train-loss"] == pytest.approx(25.0)
    stats = strategy.round_stats[1]
    assert stats.clients["train-clients-aggregated"] == 2 and stats.clients["train-rejected"] == 4
    assert stats.bytes_up == message_bytes(replies[:5]) > 0  # the error reply carries none


def test_no_usable_reply_leaves_the_global_adapter_alone():
    strategy = LoraFedAvg(FedLoraConfig(min_available_clients=1, min_train_clients=1), _state(0))
    [message] = strategy.configure_train(1, adapter_to_record(_state(0)), ConfigRecord(),
                                         StaticGrid([5]))
    arrays, metrics = strategy.aggregate_train(1, [_reply(message, _state(2, (1, 1)), 3)])
    assert arrays is None and metrics is None


def test_float16_transfer_sends_half_precision():
    strategy = LoraFedAvg(FedLoraConfig(transfer_dtype="float16", min_available_clients=1,
                                        min_train_clients=1), _state(0))
    [message] = strategy.configure_train(1, adapter_to_record(_state(0.1)), ConfigRecord(),
                                         StaticGrid([3]))
    assert {a.dtype for a in message.content["arrays"].values()} == {"float16"}


def test_evaluation_metrics_are_example_weighted():
    strategy = LoraFedAvg(FedLoraConfig(), _state(0))
    messages = list(strategy.configure_evaluate(2, adapter_to_record(_state(0)), ConfigRecord(),
                                                StaticGrid([1, 2])))
    replies = [Message(RecordDict({"metrics": MetricRecord({"num-examples": n,
                                                            "eval-accuracy": acc})}),
                       reply_to=m) for m, n, acc in zip(messages, [10, 30], [0.2, 0.6])]
    metrics = strategy.aggregate_evaluate(2, replies)
    assert metrics["eval-accuracy"] == pytest.approx(0.5) and metrics["num-examples"] == 40


def test_too_few_usable_replies_change_nothing():
    strategy = STRATEGIES["fedadam"](FedLoraConfig(strategy="fedadam", min_available_clients=3,
                                                   min_train_clients=3), _state(0))
    messages = strategy.configure_train(1, adapter_to_record(_state(0)), ConfigRecord(),
                                        StaticGrid([1, 2, 3]))
    replies = [_reply(messages[0], _state(1), 10), _reply(messages[1], _state(2), 10)]
    assert strategy.aggregate_train(1, replies) == (None, None)
    assert strategy.optimizer_state == {"m": None, "v": None}
    assert strategy.round_stats[1].clients["train-missing"] == 1
    assert strategy.round_stats[1].dropped[0]["reason"].startswith("no reply within")
