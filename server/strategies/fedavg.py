"""LoraFedAvg: example-weighted averaging of the adapter tensors (the FedIT baseline).

The base class for fedlora strategies: it checks every reply against the message contract,
drops bad ones with a log line, counts the bytes that travel, and keeps per-round statistics
that the ServerApp writes to metrics.jsonl. Subclasses change `aggregate_updates`.
"""

from __future__ import annotations

from collections import OrderedDict, defaultdict
from logging import INFO, WARNING
from typing import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.errors import FedLoraError
from common.records import adapter_to_record, record_bytes, record_to_adapter
from server.aggregation import weighted_average, weighted_mean_metrics
from server.contract import TrainUpdate, parse_metrics, parse_train_reply


class LoraFedAvg(FedAvg):
    needs_individual_updates = False  # a plain weighted sum: secure aggregation can compute it

    def __init__(self, reference: Mapping[str, torch.Tensor], transfer_dtype: str = "float32",
                 **fedavg_kwargs) -> None:
        super().__init__(**fedavg_kwargs)
        self.reference = OrderedDict((k, v.detach().clone()) for k, v in reference.items())
        self.transfer_dtype = transfer_dtype
        self.round_stats: dict[int, dict] = defaultdict(dict)

    # -- what the clients receive ------------------------------------------------------------
    def _outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        if self.transfer_dtype == "float32":
            return arrays
        return adapter_to_record(record_to_adapter(arrays), self.transfer_dtype)

    def _count_down(self, server_round: int, messages: list[Message], phase: str) -> None:
        sent = sum(record_bytes(m.content[self.arrayrecord_key]) for m in messages)
        stats = self.round_stats[server_round]
        stats["bytes-down"] = stats.get("bytes-down", 0) + sent
        stats[f"{phase}-clients-sampled"] = len(messages)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_train(server_round, self._outgoing(arrays), config,
                                                grid))
        self._count_down(server_round, messages, "train")
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        messages = list(super().configure_evaluate(server_round, self._outgoing(arrays), config,
                                                   grid))
        self._count_down(server_round, messages, "evaluate")
        return messages

    # -- what comes back -----------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[TrainUpdate] = []
        stats = self.round_stats[server_round]
        for msg in replies:
            arrays = [r for r in msg.content.values() if isinstance(r, ArrayRecord)] \
                if not msg.has_error() else []
            stats["bytes-up"] = stats.get("bytes-up", 0) + sum(map(record_bytes, arrays))
            try:
                updates.append(parse_train_reply(msg, self.reference))
            except FedLoraError as err:
                log(WARNING, "round %s: dropped the reply of node %s: %s", server_round,
                    msg.metadata.src_node_id, err)
                stats["train-rejected"] = stats.get("train-rejected", 0) + 1
        stats["train-clients-aggregated"] = len(updates)
        if not updates:
            log(WARNING, "round %s: no usable training reply; the global adapter is unchanged",
                server_round)
            return None, None
        weights = [u.num_examples for u in updates]
        aggregated = self.aggregate_updates(server_round, updates)
        metrics = weighted_mean_metrics([u.metrics for u in updates], weights)
        metrics["num-examples"] = float(sum(weights))
        stats["train"] = metrics
        log(INFO, "round %s: aggregated %s updates (%s examples)", server_round, len(updates),
            sum(weights))
        return adapter_to_record(aggregated, "float32"), MetricRecord(metrics)

    def aggregate_updates(self, server_round: int, updates: list[TrainUpdate]
                          ) -> "OrderedDict[str, torch.Tensor]":
        return weighted_average([u.state for u in updates], [u.num_examples for u in updates])

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        parsed = []
        for msg in replies:
            try:
                if msg.has_error():
                    raise FedLoraError(f"client failed: {msg.error.reason}")
                parsed.append(parse_metrics(msg))
            except FedLoraError as err:
                log(WARNING, "round %s: dropped the evaluation of node %s: %s", server_round,
                    msg.metadata.src_node_id, err)
        parsed = [m for m in parsed if m["num-examples"] > 0]
        if not parsed:
            return None
        weights = [m["num-examples"] for m in parsed]
        metrics = weighted_mean_metrics(parsed, weights)
        metrics["num-examples"] = float(sum(weights))
        self.round_stats[server_round]["evaluate"] = metrics
        return MetricRecord(metrics)
