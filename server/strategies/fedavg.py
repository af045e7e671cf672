"""LoraFedAvg: example-weighted averaging of the adapter tensors (the FedIT baseline).

The base class for fedlora strategies: it checks every reply against the message contract,
drops bad ones with a log line, counts the bytes that travel, and keeps per-round statistics
that the ServerApp writes to metrics.jsonl. Subclasses change `aggregate_updates`.
"""

from __future__ import annotations

import json
import random
import time
from collections import OrderedDict, defaultdict
from logging import INFO, WARNING
from typing import Iterable, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import FedAvg

from common.config import FedLoraConfig
from common.data_checks import total_site_reports
from common.errors import FedLoraError
from common.lora_math import exact_mean_deltas, lora_deltas, relative_error
from common.records import (
    NUM_EXAMPLES,
    PARTITION_ID,
    adapter_to_record,
    message_bytes,
    record_to_adapter,
)
from common.strategy_registry import strategy_spec
from server.aggregation import weighted_average, weighted_mean_metrics
from server.contract import (
    TrainUpdate,
    admission_for,
    parse_metrics,
    parse_train_reply,
    replying_node,
    replying_nodes,
    state_digest,
)
from server.round_record import (
    MISSING,
    PERSONAL_METRICS,
    REJECTED,
    SAMPLED,
    RoundStats,
    site_spread,
)


class LoraFedAvg(FedAvg):
    # The registry's name; what the strategy can and needs is its spec
    # (common/strategy_registry.py).
    name = "fedavg"

    def __init__(self, cfg: FedLoraConfig, reference: Mapping[str, torch.Tensor],
                 frozen: Mapping[str, torch.Tensor] | None = None,
                 fixed: Iterable[str] = ()) -> None:
        super().__init__(fraction_train=cfg.fraction_train,
                         fraction_evaluate=cfg.fraction_evaluate,
                         min_train_nodes=cfg.min_train_clients,
                         min_evaluate_nodes=cfg.min_evaluate_clients,
                         min_available_nodes=cfg.min_available_clients)
        self.cfg = cfg
        self.spec = strategy_spec(self.name)
        self.reference = OrderedDict((k, v.detach().clone()) for k, v in reference.items())
        self.frozen = OrderedDict((k, v.detach().clone()) for k, v in (frozen or {}).items())
        # Tensors the sites keep as the server sent them (a fitted head, head-mode fit): they
        # are not sent back; the global values this round sent stand in for them.
        self.fixed = frozenset(fixed)
        # Which well-formed updates are aggregated, and with what weight.
        self.admission = admission_for(cfg)
        self.scaling = cfg.lora_scaling
        self.current: OrderedDict[str, torch.Tensor] | None = None  # the global sent this round
        # Each round's record so far, until RoundRecorder writes the round's line.
        self.round_stats: dict[int, RoundStats] = defaultdict(RoundStats)
        self._nodes_reached: set[int] = set()  # this round's, for bytes per client
        self.rng = random.Random(cfg.seed)  # client sampling; checkpointed with the run
        self._train_requests: list[Message] = []  # this round's; their ids map replies to sites
        self.labels: list[str] | None = None  # the shared label set, as sent to the sites
        # Each site's latest data-check counts (by node id): sites send them with every train
        # reply, so a resumed server collects them again.
        self.data_reports: dict[int, dict] = {}

    # -- what the clients receive ------------------------------------------------------------
    def outgoing(self, arrays: ArrayRecord) -> ArrayRecord:
        """The global adapter as it travels to the sites (transfer-dtype)."""
        if self.cfg.transfer_dtype == "float32":
            return arrays
        return adapter_to_record(record_to_adapter(arrays), self.cfg.transfer_dtype)

    def _count_down(self, server_round: int, messages: list[Message], phase: str) -> None:
        sent = message_bytes(messages)
        stats = self.round_stats[server_round]
        stats.bytes_down += sent
        if phase == "train":
            stats.train_bytes_down = sent
        stats.count(phase, SAMPLED, len(messages))
        self._nodes_reached.update(m.metadata.dst_node_id for m in messages)
        stats.bytes_down_per_client = stats.bytes_down / max(len(self._nodes_reached), 1)

    def sample_nodes(self, grid: Grid, fraction: float, min_nodes: int) -> list[int]:
        """Flower's rule (fraction of the connected nodes, at least min_nodes, waiting for
        min_available), drawn from the strategy's own seeded RNG so a resumed run samples
        as the uninterrupted one would."""
        if fraction == 0.0:
            return []
        while len(nodes := sorted(grid.get_node_ids())) < max(self.min_available_nodes,
                                                               min_nodes):
            log(INFO, "waiting for nodes: %d connected, %d needed", len(nodes),
                max(self.min_available_nodes, min_nodes))
            time.sleep(1)
        size = min(max(int(len(nodes) * fraction), min_nodes), len(nodes))
        return sorted(self.rng.sample(nodes, size)) if size < len(nodes) else nodes

    def build_messages(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                       nodes: list[int], message_type: str) -> list[Message]:
        """One message per node, all with the same content: the global adapter as it travels,
        the config with the round, and what the strategy attaches (exact's residual)."""
        config["server-round"] = server_round
        record = RecordDict({self.arrayrecord_key: self.outgoing(arrays),
                             self.configrecord_key: config})
        messages = [Message(content=record, message_type=message_type, dst_node_id=node)
                    for node in nodes]
        self.attach(messages)
        return messages

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self.current = record_to_adapter(arrays)
        self._nodes_reached = set()
        if "labels" in config:
            self.labels = json.loads(str(config["labels"]))
        nodes = self.sample_nodes(grid, self.fraction_train, self.min_train_nodes)
        messages = self.build_messages(server_round, arrays, config, nodes, MessageType.TRAIN)
        self._train_requests = messages
        self._count_down(server_round, messages, "train")
        return messages

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        nodes = self.sample_nodes(grid, self.fraction_evaluate, self.min_evaluate_nodes)
        messages = self.build_messages(server_round, arrays, config, nodes,
                                       MessageType.EVALUATE)
        self._count_down(server_round, messages, "evaluate")
        return messages

    # -- what comes back -----------------------------------------------------------------------
    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        updates: list[TrainUpdate] = []
        stats = self.round_stats[server_round]
        replies = list(replies)
        requests = replying_nodes(self._train_requests)
        sampled = {m.metadata.dst_node_id for m in self._train_requests}
        for node in sorted(sampled - {replying_node(m, requests) for m in replies}):
            self.leave_out(server_round, node, f"no reply within round-timeout "
                                           f"({self.cfg.round_timeout:g}s)", "train", MISSING)
        for msg in replies:
            stats.bytes_up += message_bytes([msg])
            try:
                update = parse_train_reply(msg, self.returned_reference(),
                                           any_rank=self.spec.mixed_ranks is not None,
                                           current=self.current,
                                           max_update_norm=self.cfg.max_update_norm,
                                           num_labels=len(self.labels) if self.labels else None)
                update.state = self.with_fixed(update.state)
                self.check_update(update)
            except FedLoraError as err:
                self.leave_out(server_round, replying_node(msg, requests), str(err), "train",
                               REJECTED)
                continue
            updates.append(update)
        refused = self.admission.screen(updates, self.current or {})
        for index, reason in refused.items():
            self.leave_out(server_round, updates[index].node_id, reason, "train", REJECTED)
        updates = [u for i, u in enumerate(updates) if i not in refused]
        self.keep_data_reports(server_round, updates)
        # Replies arrive in any order; a fixed order makes the float sums reproducible.
        updates.sort(key=lambda u: (u.num_examples, state_digest(u.state)))
        updates, withheld = self.admission.release(updates, len(sampled))
        if withheld:
            log(WARNING, "round %s: %s", server_round, withheld)
        stats.aggregated = len(updates)
        if not updates or len(updates) < self.min_train_nodes:
            # Nothing is aggregated, so no strategy state (moments, residual) moves.
            log(WARNING, "round %s: %s usable training replies, %s needed; the global adapter "
                "is unchanged", server_round, len(updates), self.min_train_nodes)
            return None, None
        weights = [u.weight for u in updates]
        target = exact_mean_deltas([self.with_frozen(u.state) for u in updates],
                                   [self.scaling] * len(updates), weights)
        target = self.adjust_target(target, updates, weights)
        aggregated = self.keep_fixed(self.aggregate_updates(server_round, updates))
        stats.agg_rel_error = relative_error(self.applied_deltas(aggregated), target)
        return adapter_to_record(aggregated, "float32"), self.record_train(server_round, updates)

    def record_train(self, server_round: int, updates: list[TrainUpdate]) -> MetricRecord:
        """The round's training metrics, per site and weighted like the adapters."""
        stats = self.round_stats[server_round]
        self.keep_data_reports(server_round, updates)  # SecAgg+ comes here, not aggregate_train
        metrics = weighted_mean_metrics([u.metrics for u in updates], [u.weight for u in updates])
        metrics[NUM_EXAMPLES] = float(sum(u.num_examples for u in updates))
        stats.train = metrics
        stats.train_per_client = [{"node": u.node_id, **u.metrics} for u in updates]
        stats.bytes_up_per_client = stats.bytes_up / len(updates)
        log(INFO, "round %s: aggregated %s updates (%s examples)", server_round, len(updates),
            int(metrics[NUM_EXAMPLES]))
        return MetricRecord(metrics)

    def keep_data_reports(self, server_round: int, updates: list[TrainUpdate]) -> None:
        """Each site's latest data-check counts; the round's stats get the totals over every
        site that has reported so far."""
        for update in updates:
            if update.data_report is not None:
                self.data_reports[update.node_id] = update.data_report
        if self.data_reports:
            self.round_stats[server_round].data_checks = self.data_check_totals()

    def data_check_totals(self) -> dict:
        """Sites reported, and their summed data-check counts and label histogram."""
        return total_site_reports(self.data_reports.values(), self.labels)

    def base_offsets(self) -> dict[str, torch.Tensor]:
        """What the global model adds to the frozen base weights (exact's residual)."""
        return {}

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """What the strategy carries from round to round, for checkpoints."""
        return {}

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        """Restore what state_tensors() returned."""

    # -- what subclasses change ----------------------------------------------------------------
    def leave_out(self, server_round: int, node: int, reason: str, phase: str, what: str
                  ) -> None:
        """A client left out of this round's `phase` ("train", "head") as `what` (MISSING,
        REJECTED): logged with its node and reason."""
        log(WARNING, "round %s: left out node %s: %s", server_round, node, reason)
        self.round_stats[server_round].leave_out(node, reason, phase, what)

    def attach(self, messages: list[Message]) -> None:
        """Add records beyond the global adapter to the round's messages (see LoraExact)."""

    def check_update(self, update: TrainUpdate) -> None:
        """Strategy-specific checks beyond the message contract; raise FedLoraError."""

    def aggregate_updates(self, server_round: int, updates: list[TrainUpdate]
                          ) -> "OrderedDict[str, torch.Tensor]":
        """The new global adapter. FedAvg (FedIT): average A and B separately."""
        return self.apply_mean(server_round,
                               weighted_average([u.state for u in updates],
                                                [u.weight for u in updates]))

    def apply_mean(self, server_round: int, mean: "OrderedDict[str, torch.Tensor]"
                   ) -> "OrderedDict[str, torch.Tensor]":
        """The new global adapter from the weighted mean of the replies (all that secure
        aggregation reveals). FedAvg takes the mean itself."""
        return mean

    def returned_reference(self) -> "OrderedDict[str, torch.Tensor]":
        """The tensors a site's reply holds: the adapter but the fixed ones."""
        return OrderedDict((n, t) for n, t in self.reference.items() if n not in self.fixed)

    def returned_names(self) -> list[str]:
        return list(self.returned_reference())

    def with_fixed(self, state: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
        """A reply's tensors with the fixed ones put back as this round sent them, in the
        adapter's order."""
        return OrderedDict((n, self.current[n] if n in self.fixed else state[n])
                           for n in self.reference if n in state or n in self.fixed)

    def keep_fixed(self, state: "OrderedDict[str, torch.Tensor]"
                   ) -> "OrderedDict[str, torch.Tensor]":
        """The new global adapter with the fixed tensors exactly as sent (whatever a rule's
        arithmetic did to equal values)."""
        for name in self.fixed:
            state[name] = self.current[name].clone()
        return state

    def with_frozen(self, state: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        """The adapter with factors that never travel (FFA's frozen A) put back."""
        return {**self.frozen, **state} if self.frozen else state

    def applied_deltas(self, new_state: Mapping[str, torch.Tensor]) -> dict:
        """What the new global adds to each adapted weight: s * B @ A."""
        return lora_deltas(self.with_frozen(new_state), self.scaling)

    def adjust_target(self, target: dict, updates: list[TrainUpdate], weights: list) -> dict:
        """The exact mean the applied update is measured against; see LoraExact."""
        return target

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        parsed: dict[int, dict[str, float]] = {}  # node -> its metrics
        for msg in replies:
            try:
                if msg.has_error():
                    raise FedLoraError(f"client failed: {msg.error.reason}")
                parsed[msg.metadata.src_node_id] = parse_metrics(msg)
            except FedLoraError as err:
                log(WARNING, "round %s: dropped the evaluation of node %s: %s", server_round,
                    msg.metadata.src_node_id, err)
        parsed = {node: m for node, m in parsed.items() if m[NUM_EXAMPLES] > 0}
        if not parsed:
            return None
        per_client = [{"node": node, **m} for node, m in parsed.items()]
        stats = self.round_stats[server_round]
        stats.evaluate_per_client = per_client
        metric = "eval-accuracy" if self.cfg.is_classification else "eval-loss"
        spread = site_spread({"evaluate-per-client": per_client}, metric,
                             higher_is_better=self.cfg.is_classification)
        if spread is not None:
            stats.evaluate_sites = {
                "metric": metric, "worst": spread[0], "median": spread[1]}
            for other in PERSONAL_METRICS:  # personal-head: the same sites, other heads
                if (values := site_spread({"evaluate-per-client": per_client}, other,
                                          higher_is_better=True)) is not None:
                    stats.evaluate_sites[other] = {"worst": values[0], "median": values[1]}
        weights = [m[NUM_EXAMPLES] for m in parsed.values()]
        metrics = weighted_mean_metrics(
            [{k: v for k, v in m.items() if k != PARTITION_ID} for m in parsed.values()],
            weights)
        metrics[NUM_EXAMPLES] = float(sum(weights))
        stats.evaluate = metrics
        return MetricRecord(metrics)
