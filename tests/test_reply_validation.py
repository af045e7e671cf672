"""Malformed replies thrown at the server: none gets through, none crashes it."""

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.records import adapter_to_record, record_to_adapter
from server.contract import parse_train_reply, round_outliers
from server.strategies.fedavg import LoraFedAvg
from tests.conftest import StaticGrid

pytestmark = pytest.mark.usefixtures("task_identity")

REFERENCE = OrderedDict([("m.lora_A.default.weight", torch.zeros(2, 3)),
                         ("m.lora_B.default.weight", torch.zeros(4, 2)),
                         ("head.modules_to_save.default.bias", torch.zeros(5))])


def _instruction():
    strategy = LoraFedAvg(FedLoraConfig(min_available_clients=1, min_train_clients=1),
                          REFERENCE)
    [message] = strategy.configure_train(1, adapter_to_record(REFERENCE), ConfigRecord(),
                                         StaticGrid([9]))
    return message


def _array(draw_values, shape, dtype):
    values = np.asarray(draw_values, dtype=np.float64).reshape(shape)
    return Array(values.astype(dtype))


finite = st.floats(-10, 10, allow_nan=False)
anything = st.one_of(finite, st.just(float("nan")), st.just(float("inf")))


@st.composite
def tensors(draw):
    """A record that may lose, add, reshape, retype, poison or garble any tensor."""
    record = {}
    for name, ref in REFERENCE.items():
        action = draw(st.sampled_from(["keep", "keep", "drop", "reshape", "dtype", "poison",
                                       "garble"]))
        shape = tuple(ref.shape)
        if action == "drop":
            continue
        if action == "reshape":
            shape = tuple(draw(st.integers(1, 5)) for _ in range(draw(st.integers(1, 3))))
        dtype = draw(st.sampled_from(["float64", "int32", "float16"])) if action == "dtype" \
            else "float32"
        n = int(np.prod(shape))
        values = draw(st.lists(anything if action == "poison" else finite, min_size=n,
                               max_size=n))
        array = _array(values, shape, dtype)
        if action == "garble":
            array = Array(dtype="float32", shape=shape, stype="numpy.ndarray",
                          data=draw(st.binary(max_size=64)))
        record[name] = array
    if draw(st.booleans()) and draw(st.booleans()):
        record["extra.weight"] = _array([1.0], (1,), "float32")
    return ArrayRecord(record)


@st.composite
def replies(draw):
    content = {}
    if draw(st.integers(0, 5)):
        content["arrays"] = draw(tensors())
    if draw(st.integers(0, 9)) == 0:
        content["more-arrays"] = draw(tensors())
    if draw(st.integers(0, 5)):
        count = draw(st.one_of(st.integers(-5, 10**12), st.floats(allow_nan=True),
                               st.just(100)))
        content["metrics"] = MetricRecord({"num-examples": count,
                                           "train-loss": draw(anything)})
    return Message(RecordDict(content), reply_to=_instruction())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(replies())
def test_no_malformed_reply_gets_through(msg):
    try:
        update = parse_train_reply(msg, REFERENCE)
    except FedLoraError:
        return
    assert list(update.state) == list(REFERENCE)
    for name, tensor in update.state.items():
        assert tensor.shape == REFERENCE[name].shape and torch.isfinite(tensor).all()
    assert 0 < update.num_examples <= 2**31
    assert all(np.isfinite(v) for v in update.metrics.values())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(replies(), min_size=1, max_size=4))
def test_bad_replies_never_touch_the_global_adapter(batch):
    strategy = LoraFedAvg(FedLoraConfig(min_available_clients=1, min_train_clients=1),
                          REFERENCE)
    strategy.configure_train(1, adapter_to_record(REFERENCE), ConfigRecord(), StaticGrid([9]))
    good = OrderedDict((k, torch.ones_like(v)) for k, v in REFERENCE.items())
    batch.append(Message(RecordDict({"arrays": adapter_to_record(good),
                                     "metrics": MetricRecord({"num-examples": 7})}),
                         reply_to=_instruction()))
    arrays, _ = strategy.aggregate_train(1, batch)  # must not raise
    result = record_to_adapter(arrays)
    assert all(torch.isfinite(t).all() for t in result.values())
    assert list(result) == list(REFERENCE)


def test_an_update_beyond_the_norm_bound_is_dropped():
    big = OrderedDict((k, torch.full_like(v, 10.0)) for k, v in REFERENCE.items())
    msg = Message(RecordDict({"arrays": adapter_to_record(big),
                              "metrics": MetricRecord({"num-examples": 3})}),
                  reply_to=_instruction())
    with pytest.raises(FedLoraError, match="exceeds max-update-norm"):
        parse_train_reply(msg, REFERENCE, current=REFERENCE, max_update_norm=5.0)
    assert parse_train_reply(msg, REFERENCE, current=REFERENCE, max_update_norm=1e3)


def _npy(values: np.ndarray) -> bytes:
    return Array(values).data


@pytest.mark.parametrize("label, data", [
    ("float64 bytes declared float32", _npy(np.ones((4, 2), np.float64))),
    ("int8 bytes declared float32", _npy(np.full((4, 2), 100, np.int8))),
    ("another shape in the header", _npy(np.ones((2, 4), np.float32))),
    ("values cut short", _npy(np.ones((4, 2), np.float32))[:-4]),
    ("bytes appended", _npy(np.ones((4, 2), np.float32)) + b"\x00\x00\x80\x7f"),
    ("no npy header", np.ones((4, 2), np.float32).tobytes()),
])
def test_a_payload_unlike_its_declared_dtype_and_shape_is_refused(label, data):
    record = dict(adapter_to_record(REFERENCE))
    record["m.lora_B.default.weight"] = Array(dtype="float32", shape=(4, 2),
                                              stype="numpy.ndarray", data=data)
    msg = Message(RecordDict({"arrays": ArrayRecord(record),
                              "metrics": MetricRecord({"num-examples": 3})}),
                  reply_to=_instruction())
    with pytest.raises(FedLoraError, match="adapter tensor 'm.lora_B.default.weight'"):
        parse_train_reply(msg, REFERENCE)


@st.composite
def rounds_with_one_hostile_reply(draw):
    """Honest replies (50-500 examples, updates of unit scale) and one that claims a huge
    example count, sends huge finite values (float32, float16 or int8), or both."""
    honest = draw(st.integers(2, 5))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    states = [OrderedDict((k, torch.rand(v.shape, generator=generator) * 2 - 1)
                          for k, v in REFERENCE.items()) for _ in range(honest)]
    counts = [draw(st.integers(50, 500)) for _ in range(honest)]
    kind = draw(st.sampled_from(["count", "values", "both"]))
    dtype = draw(st.sampled_from(["float32", "float16", "int8"]))
    top = 6e4 if dtype == "float16" else 3e38
    scale = draw(st.floats(1e3, top)) if kind != "count" else 1.0
    hostile = OrderedDict((k, torch.rand(v.shape, generator=generator).clamp_min(0.5) * scale)
                          for k, v in REFERENCE.items())
    count = draw(st.integers(50_001, 2**31)) if kind != "values" else draw(st.integers(50, 500))
    position = draw(st.integers(0, honest))
    return states, counts, (hostile, count, dtype), position


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rounds_with_one_hostile_reply())
def test_a_hostile_reply_never_reaches_the_aggregate(round_):
    states, counts, (hostile, count, dtype), position = round_

    def aggregate(with_hostile: bool):
        strategy = LoraFedAvg(FedLoraConfig(min_available_clients=1, min_train_clients=1),
                              REFERENCE)
        nodes = list(range(1, len(states) + 2))
        messages = strategy.configure_train(1, adapter_to_record(REFERENCE), ConfigRecord(),
                                            StaticGrid(nodes))
        by_node = {m.metadata.dst_node_id: m for m in messages}
        replies = [Message(RecordDict({"arrays": adapter_to_record(s),
                                       "metrics": MetricRecord({"num-examples": n})}),
                           reply_to=by_node[node])
                   for node, s, n in zip(nodes, states, counts)]
        if with_hostile:
            replies.insert(position, Message(
                RecordDict({"arrays": adapter_to_record(hostile, dtype),
                            "metrics": MetricRecord({"num-examples": count})}),
                reply_to=by_node[nodes[-1]]))
        arrays, _ = strategy.aggregate_train(1, replies)
        return record_to_adapter(arrays), strategy.round_stats[1]

    attacked, stats = aggregate(with_hostile=True)
    clean, _ = aggregate(with_hostile=False)
    assert [d["node"] for d in stats.dropped] == [len(states) + 1]
    assert all(torch.equal(attacked[k], clean[k]) for k in REFERENCE)


def test_two_replies_check_each_other_and_a_lone_reply_is_kept():
    assert list(round_outliers([100, 100], [1.0, 50.0], 100, 10)) == [1]
    assert list(round_outliers([10**9, 100], [1.0, 1.0], 100, 10)) == [0]
    assert round_outliers([100], [1e30], 100, 10) == {}
    assert round_outliers([10**9, 100], [1.0, 1e9], 0, 0) == {}  # both tests off
