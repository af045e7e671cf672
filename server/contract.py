"""The message contract: what a client's reply must hold before anything aggregates it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from common.errors import FedLoraError
from common.records import check_adapter_matches, record_to_adapter

NUM_EXAMPLES = "num-examples"


@dataclass
class TrainUpdate:
    node_id: int
    state: "dict[str, torch.Tensor]"
    num_examples: int
    metrics: dict[str, float]


def parse_metrics(msg: Message) -> dict[str, float]:
    records = [r for r in msg.content.values() if isinstance(r, MetricRecord)]
    if len(records) != 1:
        raise FedLoraError(f"expected one MetricRecord, got {len(records)}")
    metrics = dict(records[0])
    count = metrics.get(NUM_EXAMPLES)
    if not isinstance(count, int) or isinstance(count, bool) or count < 0:
        raise FedLoraError(f"'{NUM_EXAMPLES}' must be a non-negative integer, got {count!r}")
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def parse_train_reply(msg: Message, reference: Mapping[str, torch.Tensor],
                      any_rank: bool = False) -> TrainUpdate:
    """Decode a train reply; raise FedLoraError naming what is wrong."""
    if msg.has_error():
        raise FedLoraError(f"client failed: {msg.error.reason}")
    metrics = parse_metrics(msg)
    if metrics[NUM_EXAMPLES] <= 0:
        raise FedLoraError(f"'{NUM_EXAMPLES}' must be positive to weigh an update")
    records = [r for r in msg.content.values() if isinstance(r, ArrayRecord)]
    if len(records) != 1:
        raise FedLoraError(f"expected one ArrayRecord, got {len(records)}")
    state = record_to_adapter(records[0])
    check_adapter_matches(state, reference, sender=f"node {msg.metadata.src_node_id}",
                          any_rank=any_rank)
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise FedLoraError(f"tensor {name!r} has non-finite values")
    return TrainUpdate(node_id=msg.metadata.src_node_id, state=state,
                       num_examples=int(metrics[NUM_EXAMPLES]),
                       metrics={k: v for k, v in metrics.items() if math.isfinite(v)})
