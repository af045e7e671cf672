"""The message contract: what a client's reply must hold before anything aggregates it."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from logging import WARNING
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.common import log

from common.config import TRANSFER_DTYPES
from common.data_checks import LABEL_COUNTS, METRIC_PREFIX, SITE_COUNTS
from common.errors import FedLoraError
from common.head import HeadStatistics, array_names
from common.records import (
    NUM_EXAMPLES,
    check_adapter_matches,
    record_to_adapter,
    record_to_tensors,
)

MAX_EXAMPLES = 2**31  # more examples than this from one site is not a real count


@dataclass
class TrainUpdate:
    node_id: int
    state: "dict[str, torch.Tensor]"
    num_examples: int
    metrics: dict[str, float]  # training metrics, to average; never the data-* counts
    weight: float = 0.0  # its share of the average: num_examples, or 1 under client-level DP
    data_report: dict[str, Any] | None = None  # the site's data-check counts, if it sent them

    def __post_init__(self) -> None:
        self.weight = self.weight or float(self.num_examples)
        if any(k.startswith(METRIC_PREFIX) for k in self.metrics):
            # SecAgg+ hands over its legacy metrics, with the data-* counts (as floats) in them.
            if self.data_report is None:
                self.data_report = _legacy_data_report(self.node_id, self.metrics)
            self.metrics = {k: v for k, v in self.metrics.items()
                            if not k.startswith(METRIC_PREFIX)}


def replying_nodes(requests: Sequence[Message]) -> dict[str, int]:
    """For replying_node: each sent request's id (given when pushed) and the node it went to."""
    return {m.metadata.message_id: m.metadata.dst_node_id for m in requests
            if m.metadata.message_id}


def replying_node(msg: Message, requests: Mapping[str, int]) -> int:
    """The site a reply stands for: the node its request went to. Not always its sender: for a
    site that stopped heart-beating, the SuperLink itself answers in the site's place."""
    return requests.get(msg.metadata.reply_to_message_id, msg.metadata.src_node_id)


def metric_record(msg: Message) -> MetricRecord:
    records = [r for r in msg.content.values() if isinstance(r, MetricRecord)]
    if len(records) != 1:
        raise FedLoraError(f"expected one MetricRecord, got {len(records)}")
    return records[0]


def parse_metrics(msg: Message) -> dict[str, float]:
    metrics = dict(metric_record(msg))
    count = metrics.get(NUM_EXAMPLES)
    if not isinstance(count, int) or isinstance(count, bool) or not 0 <= count <= MAX_EXAMPLES:
        raise FedLoraError(f"'{NUM_EXAMPLES}' must be an integer from 0 to {MAX_EXAMPLES}, "
                           f"got {count!r}")
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            and not k.startswith(METRIC_PREFIX)}  # data-* counts are no metric to average


def parse_data_report(metrics: Mapping[str, Any], num_labels: int | None = None
                      ) -> dict[str, Any] | None:
    """A site's data-check counts from its reply's metrics (data-rows, ..., data-label-counts),
    named without the prefix; None if it sent none. Raise FedLoraError naming a missing or
    implausible count: each a non-negative integer, none above data-rows, the histogram one
    count per label of the shared set (when num_labels is known), adding up to at most
    data-rows. Other data-* keys are ignored."""
    if not any(key.startswith(METRIC_PREFIX) for key in metrics):
        return None
    report: dict[str, Any] = {}
    for name in SITE_COUNTS:
        report[name] = _count(metrics.get(METRIC_PREFIX + name), METRIC_PREFIX + name)
    for name in SITE_COUNTS[1:]:
        if report[name] > report["rows"]:
            raise FedLoraError(f"'{METRIC_PREFIX}{name}' ({report[name]}) exceeds "
                               f"'{METRIC_PREFIX}rows' ({report['rows']})")
    key = METRIC_PREFIX + LABEL_COUNTS
    if key in metrics:
        histogram = metrics[key]
        if not isinstance(histogram, list):
            raise FedLoraError(f"'{key}' must be a list of counts, got {histogram!r}")
        counts = [_count(value, key) for value in histogram]
        if num_labels is not None and len(counts) != num_labels:
            raise FedLoraError(f"'{key}' has {len(counts)} counts; the shared label set has "
                               f"{num_labels} labels")
        if sum(counts) > report["rows"]:
            raise FedLoraError(f"'{key}' adds up to {sum(counts)}, more than "
                               f"'{METRIC_PREFIX}rows' ({report['rows']})")
        report[LABEL_COUNTS] = counts
    return report


def _count(value: Any, key: str) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= MAX_EXAMPLES:
        raise FedLoraError(f"'{key}' must be an integer from 0 to {MAX_EXAMPLES}, got {value!r}")
    return value


def _legacy_data_report(node_id: int, metrics: Mapping[str, float]) -> dict[str, Any] | None:
    """The counts from metrics that came through SecAgg+ as floats (without the histogram,
    which its legacy records cannot carry). The update is in the secure sum already, so a
    malformed report is only logged."""
    counts = {k: int(v) if isinstance(v, float) and v.is_integer() else v
              for k, v in metrics.items() if k.startswith(METRIC_PREFIX)}
    try:
        return parse_data_report(counts)
    except FedLoraError as err:
        log(WARNING, "ignored the data-check counts of node %s: %s", node_id, err)
        return None


def check_adapter_values(state: Mapping[str, torch.Tensor],
                         reference: Mapping[str, torch.Tensor], sender: str,
                         any_rank: bool = False) -> None:
    """What every adapter the server aggregates or takes must be, a site's reply or a secure
    sum: the names and shapes of `reference` (ranks free with any_rank) and finite values."""
    check_adapter_matches(state, reference, sender=sender, any_rank=any_rank)
    for name, tensor in state.items():
        if not torch.isfinite(tensor).all():
            raise FedLoraError(f"tensor {name!r} has non-finite values")


def parse_train_reply(msg: Message, reference: Mapping[str, torch.Tensor],
                      any_rank: bool = False, current: Mapping[str, torch.Tensor] | None = None,
                      max_update_norm: float = 0.0, num_labels: int | None = None
                      ) -> TrainUpdate:
    """Decode a train reply; raise FedLoraError naming what is wrong. Checked: the client's
    own error, one MetricRecord with a plausible example count and, if sent, plausible
    data-check counts (see parse_data_report), one ArrayRecord of float32,
    float16 or int8 (with its scales) arrays that decode, the local model's names and shapes,
    finite values, and (with max_update_norm > 0) the L2 norm of the update against the
    current global adapter."""
    if msg.has_error():
        raise FedLoraError(f"client failed: {msg.error.reason}")
    metrics = parse_metrics(msg)
    data_report = parse_data_report(metric_record(msg), num_labels)
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
    check_adapter_values(state, reference, f"node {msg.metadata.src_node_id}", any_rank)
    if max_update_norm > 0 and current is not None:
        norm = update_norm(state, current)
        if norm > max_update_norm:
            raise FedLoraError(f"update norm {norm:.4g} exceeds max-update-norm "
                               f"{max_update_norm:.4g}")
    return TrainUpdate(node_id=msg.metadata.src_node_id, state=state,
                       num_examples=int(metrics[NUM_EXAMPLES]),
                       metrics={k: v for k, v in metrics.items() if math.isfinite(v)},
                       data_report=data_report)


HEAD_SPLITS = ("train", "val")  # the splits whose statistics a head reply holds
# Unit-length features: a row adds at most 1 to each entry of the Gram matrix's trace share;
# float32 features are unit length to about this relative error.
UNIT_NORM_TOLERANCE = 1e-3


@dataclass
class HeadReply:
    node_id: int
    train: HeadStatistics
    val: HeadStatistics
    num_examples: int  # the site's training rows, as its metrics say
    metrics: dict[str, float]


def head_statistics_from(arrays: Mapping[str, torch.Tensor], dim: int, num_labels: int
                         ) -> tuple[HeadStatistics, HeadStatistics]:
    """The train and val statistics in `arrays`, a site's or a secure sum's: finite, and in
    the shapes of `dim` features and `num_labels` labels."""
    for name, tensor in arrays.items():
        if not torch.isfinite(tensor).all():
            raise FedLoraError(f"head statistic {name!r} has non-finite values")
    try:
        train, val = (HeadStatistics.from_arrays(arrays, split, dim, num_labels)
                      for split in HEAD_SPLITS)
    except ValueError as err:
        raise FedLoraError(f"head statistics: {err}") from None
    return train, val


def parse_head_reply(msg: Message, dim: int, num_labels: int, noisy: bool,
                     unit_features: bool) -> HeadReply:
    """Decode a head-statistics reply; raise FedLoraError naming what is wrong. Checked: the
    client's own error, one MetricRecord with a plausible example count, one ArrayRecord of
    exactly the statistics' float64 arrays (common/head.py) in their shapes, finite values.
    Without noise (no DP) the statistics must also be what rows could sum to: whole,
    non-negative counts adding up to num-examples, and (unit_features: features scaled to unit
    length) a Gram trace equal to the row count and class sums no longer than their counts."""
    if msg.has_error():
        raise FedLoraError(f"client failed: {msg.error.reason}")
    metrics = parse_metrics(msg)
    num_examples = int(metrics[NUM_EXAMPLES])
    if num_examples <= 0:
        raise FedLoraError(f"'{NUM_EXAMPLES}' must be positive: a site without training rows "
                           f"has no statistics to add")
    records = [r for r in msg.content.values() if isinstance(r, ArrayRecord)]
    if len(records) != 1:
        raise FedLoraError(f"expected one ArrayRecord, got {len(records)}")
    expected = array_names(HEAD_SPLITS)
    if sorted(records[0].keys()) != sorted(expected):
        raise FedLoraError(f"head statistics must be exactly the arrays {', '.join(expected)}; "
                           f"got {', '.join(records[0].keys()) or 'none'}")
    for name, array in records[0].items():
        if array.dtype != "float64":
            raise FedLoraError(f"head statistic {name!r} has dtype {array.dtype}, not float64")
    train, val = head_statistics_from(record_to_tensors(records[0]), dim, num_labels)
    if not noisy:
        for split, stats in zip(HEAD_SPLITS, (train, val)):
            _check_exact_statistics(split, stats, unit_features)
        if train.num_rows != num_examples:
            raise FedLoraError(f"head statistics count {train.num_rows:g} training rows, "
                               f"'{NUM_EXAMPLES}' says {num_examples}")
    return HeadReply(node_id=msg.metadata.src_node_id, train=train, val=val,
                     num_examples=num_examples, metrics=metrics)


def _check_exact_statistics(split: str, stats: HeadStatistics, unit_features: bool) -> None:
    counts = stats.class_counts
    if bool((counts < 0).any()) or not bool((counts == counts.round()).all()):
        raise FedLoraError(f"head statistics: {split} class counts must be whole numbers >= 0")
    if not unit_features:
        return
    rows = stats.num_rows
    if abs(float(stats.gram.diagonal().sum()) - rows) > UNIT_NORM_TOLERANCE * max(rows, 1):
        raise FedLoraError(f"head statistics: the {split} Gram matrix's trace is "
                           f"{float(stats.gram.diagonal().sum()):.6g}, not its row count "
                           f"{rows:g} (features are unit length)")
    lengths = stats.class_sums.norm(dim=1)
    if bool((lengths > counts * (1 + UNIT_NORM_TOLERANCE) + 1e-9).any()):
        raise FedLoraError(f"head statistics: a {split} class sum is longer than its row count "
                           f"(features are unit length)")


def update_norm(state: Mapping[str, torch.Tensor], current: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of (update - global) over the tensors both have with equal shapes."""
    total = 0.0
    for name, tensor in state.items():
        base = current.get(name)
        diff = tensor - base if base is not None and base.shape == tensor.shape else tensor
        total += float(diff.double().pow(2).sum())
    return total ** 0.5


def round_outliers(num_examples: Sequence[float], norms: Sequence[float], examples_ratio: float,
                   norm_ratio: float) -> dict[int, str]:
    """The replies far outside the rest of their round, by index, with the reason: an example
    count above examples_ratio times the median count of the round's other replies, or an
    update norm above norm_ratio times the median of theirs (a ratio of 0 turns its test off).
    Each reply is held against the others, not against a median that includes it, so that even
    two sites check each other; a lone reply has nothing to be held against."""
    counts = np.asarray(num_examples, dtype=np.float64)
    sizes = np.asarray(norms, dtype=np.float64)
    reasons: dict[int, str] = {}
    for i in range(len(counts) if len(counts) > 1 else 0):
        for values, ratio, what, key in ((counts, examples_ratio, "example count",
                                          "max-examples-ratio"),
                                         (sizes, norm_ratio, "update norm",
                                          "max-update-norm-ratio")):
            typical = float(np.median(np.delete(values, i)))
            if ratio > 0 and typical > 0 and values[i] > ratio * typical:
                reasons[i] = (f"{what} {values[i]:.4g} is more than {key} ({ratio:g}) times the "
                              f"median of the round's other replies ({typical:.4g})")
                break
    return reasons


class OutlierScreen:
    """Which of a round's well-formed updates are aggregated, by default: none far outside the
    rest of the round (`round_outliers`), each with its example weight. Client-level DP admits
    otherwise (ClientDPAdmission below)."""

    def __init__(self, cfg) -> None:
        self.examples_ratio = cfg.max_examples_ratio
        self.norm_ratio = cfg.max_update_norm_ratio

    def screen(self, updates: Sequence[TrainUpdate], current: Mapping[str, torch.Tensor]
               ) -> dict[int, str]:
        """The updates refused, by index, with the reason."""
        return round_outliers([u.num_examples for u in updates],
                              [update_norm(u.state, current) for u in updates],
                              self.examples_ratio, self.norm_ratio)

    def release(self, updates: list[TrainUpdate], sampled: int
                ) -> tuple[list[TrainUpdate], str | None]:
        """The updates to aggregate, or none and why (nothing to say here)."""
        return updates, None


class ClientDPAdmission:
    """Client-level DP noise is calibrated to clip norm / clients sampled: no update is refused
    for its size (clipping bounds each site), and every sampled site's update must be in the
    mean, each with the same weight; else nothing is released this round."""

    def screen(self, updates: Sequence[TrainUpdate], current) -> dict[int, str]:
        return {}

    def release(self, updates: list[TrainUpdate], sampled: int
                ) -> tuple[list[TrainUpdate], str | None]:
        if len(updates) < sampled:
            return [], (f"client-level DP needs all {sampled} sampled updates, "
                        f"{len(updates)} usable: no release this round")
        for update in updates:
            update.weight = 1.0
        return updates, None


def admission_for(cfg) -> OutlierScreen | ClientDPAdmission:
    """How a run admits well-formed updates to the aggregate."""
    return ClientDPAdmission() if cfg.client_level_dp else OutlierScreen(cfg)


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(name.encode())
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()
