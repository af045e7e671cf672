"""common/packed_records.py and server/packed_grid.py: a message's arrays travel as one array
and come back bit for bit; packed records that do not add up are one line, and a site's reply
of that kind becomes that site's error reply. (Through a real site runtime:
tests/test_site_runtime.py; over a real SuperLink: tests/test_deployment.py.)"""

from __future__ import annotations

import json
from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from common.errors import FedLoraError
from common.flower_compat import stamp_message_id
from common.packed_records import PACKED_ARRAY, PACKED_KEY, is_packed, pack, unpack
from common.records import adapter_to_record
from server.packed_grid import PackedGrid


def _adapter(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return OrderedDict((f"layer.{i}.lora_{ab}.weight", torch.randn(4, 3 + i, generator=g))
                       for i in range(6) for ab in "AB")


def _content(dtype: str = "float32") -> RecordDict:
    return RecordDict({"arrays": adapter_to_record(_adapter(), dtype),
                       "one": ArrayRecord({"x": Array(np.arange(3.0))}),
                       "metrics": MetricRecord({"num-examples": 12}),
                       "config": ConfigRecord({"server-round": 2})})


@pytest.mark.parametrize("dtype", ["float32", "float16", "int8"])
def test_packed_arrays_come_back_bit_for_bit(dtype):
    content = _content(dtype)
    packed = pack(content)
    assert is_packed(packed) and not is_packed(content)
    assert list(packed["arrays"]) == [PACKED_ARRAY]  # 12 (13 with int8's scales) arrays: one
    assert list(packed["one"]) == ["x"]  # a single array is left as it is
    back = unpack(packed)
    assert list(back) == ["arrays", "one", "metrics", "config"]
    assert back["arrays"].object_id == content["arrays"].object_id  # names, order, bytes
    assert dict(back["metrics"]) == {"num-examples": 12}
    assert unpack(content) is content
    with pytest.raises(FedLoraError, match="fedlora's own"):  # a key of ours is not data
        pack(packed)


def _corrupt(how: str) -> RecordDict:
    packed = pack(_content())
    layout = json.loads(packed[PACKED_KEY]["arrays"])
    if how == "short":
        blob = packed["arrays"][PACKED_ARRAY]
        packed["arrays"] = ArrayRecord({PACKED_ARRAY: Array(
            dtype=blob.dtype, shape=(len(blob.data) - 4,), stype=blob.stype,
            data=blob.data[:-4])})
    elif how == "layout":
        packed[PACKED_KEY] = ConfigRecord({"arrays": "not json"})
    elif how == "twice":
        layout[1][0] = layout[0][0]
        packed[PACKED_KEY] = ConfigRecord({"arrays": json.dumps(layout)})
    elif how == "missing":
        del packed["arrays"]
    return packed


@pytest.mark.parametrize("how,says", [("short", "holds"), ("layout", "unreadable layout"),
                                      ("twice", "names an array twice"),
                                      ("missing", "no record 'arrays'")])
def test_packed_records_that_do_not_add_up_are_one_line(how, says):
    with pytest.raises(FedLoraError, match=says) as err:
        unpack(_corrupt(how))
    assert "\n" not in str(err.value)


class EchoGrid:
    """Each site answers with the arrays it was sent, packed as a site packs; site 3's reply is
    cut short on the way."""

    def __init__(self) -> None:
        self.sent = []

    def send_and_receive(self, messages, timeout=None):
        replies = []
        for msg in messages:
            stamp_message_id(msg)
            self.sent.append(msg.content)
            content = RecordDict({"arrays": unpack(msg.content)["arrays"],
                                  "metrics": MetricRecord({"num-examples": 5})})
            packed = _corrupt("short") if msg.metadata.dst_node_id == 3 else pack(content)
            replies.append(Message(packed, reply_to=msg))
        return replies


def test_the_grid_packs_what_it_sends_and_a_bad_packed_reply_is_its_sites_error(task_identity):
    grid = EchoGrid()
    content = RecordDict({"arrays": adapter_to_record(_adapter())})  # as a strategy shares it
    messages = [Message(content, dst_node_id=node, message_type="train") for node in (1, 2, 3)]
    replies = PackedGrid(grid).send_and_receive(messages, timeout=10)
    assert all(list(sent["arrays"]) == [PACKED_ARRAY] for sent in grid.sent)
    assert grid.sent[0] is grid.sent[1] is grid.sent[2]  # packed once for all three sites
    assert all(list(m.content["arrays"]) != [PACKED_ARRAY] for m in messages)  # as made
    good = [r for r in replies if not r.has_error()]
    assert [r.metadata.src_node_id for r in good] == [1, 2]
    assert all(r.content["arrays"].object_id == messages[0].content["arrays"].object_id
               for r in good)
    bad = [r for r in replies if r.has_error()]
    assert [r.metadata.src_node_id for r in bad] == [3]
    assert bad[0].metadata.reply_to_message_id == messages[2].metadata.message_id
    assert bad[0].error.reason.startswith("bad reply: packed message: record 'arrays' holds")
