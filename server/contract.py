"""The message contract: what a client's reply must hold before anything aggregates it."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Mapping

import torch
from flwr.app import ArrayRecord, Message, MetricRecord

from common.config import TRANSFER_DTYPES
from common.errors import FedLoraError
from common.records import NUM_EXAMPLES, check_adapter_matches, record_to_adapter

MAX_EXAMPLES = 2**31  # more examples than this from one site is not a real count


@dataclass
class TrainUpdate:
    node_id: int
    state: "dict[str, torch.Tensor]"
    num_examples: int
    metrics: dict[str, float]
    weight: float = 0.0  # its share of the average: num_examples, or 1 under client-level DP

    def __post_init__(self) -> None:
        self.weight = self.weight or float(self.num_examples)


def parse_metrics(msg: Message) -> dict[str, float]:
    records = [r for r in msg.content.values() if isinstance(r, MetricRecord)]
    if len(records) != 1:
        raise FedLoraError(f"expected one MetricRecord, got {len(records)}")
    metrics = dict(records[0])
    count = metrics.get(NUM_EXAMPLES)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_EXAMPLES:
        raise FedLoraError(f"'{NUM_EXAMPLES}' must be an integer from 0 to {MAX_EXAMPLES}, "
                           f"got {count!r}")
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def parse_train_reply(msg: Message, reference: Mapping[str, torch.Tensor],
                      any_rank: bool = False, current: Mapping[str, torch.Tensor] | None = None,
                      max_update_norm: float = 0.0) -> TrainUpdate:
    """Decode a train reply; raise FedLoraError naming what is wrong. Checked: the client's
    own error, one MetricRecord with a plausible example count, one ArrayRecord of float32,
    float16 or int8 (with its scales) arrays that decode, the local model's names and shapes,
    finite values, and (with max_update_norm > 0) the L2 norm of the update against the
    current global adapter."""
    if msg.has_error():
        raise FedLoraError(f"client failed: {msg.error.reason}")
    metrics = parse_metrics(msg)
    if metrics[NUM_EXAMPLES] <= 0:
        raise FedLoraError(f"'{NUM_EXAMPLES}' must be positive to weigh an update")
    records = [r for r in msg.content.values() if isinstance(r, ArrayRecord)]
    if len(records) != 1:
        raise FedLoraError(f"expected one ArrayRecord, got {len(records)}")
    for name, array in records[0].items():
        if array.dtype not in TRANSFER_DTYPES:
            raise FedLoraError(f"tensor {name!r} has dtype {array.dtype}; adapters travel as "
                               f"{', '.join(TRANSFER_DTYPES)}")
    state = record_to_adapter(records[0])
    check_adapter_matches(state, reference, sender=f"node {msg.metadata.src_node_id}",
                          any_rank=any_rank)
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise FedLoraError(f"tensor {name!r} has non-finite values")
    if max_update_norm > 0 and current is not None:
        norm = update_norm(state, current)
        if norm > max_update_norm:
            raise FedLoraError(f"update norm {norm:.4g} exceeds max-update-norm "
                               f"{max_update_norm:.4g}")
    return TrainUpdate(node_id=msg.metadata.src_node_id, state=state,
                       num_examples=int(metrics[NUM_EXAMPLES]),
                       metrics={k: v for k, v in metrics.items() if math.isfinite(v)})


def update_norm(state: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of (update - global) over the tensors both have with equal shapes."""
    total = 0.0
    for name, tensor in state.items():
        base = current.get(name)
        diff = tensor - base if base is not None and base.shape == tensor.shape else tensor
        total += float(diff.double().pow(2).sum())
    return total ** 0.5


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()
