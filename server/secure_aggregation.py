"""Secure aggregation: a round's training exchange through Flower's SecAgg+ workflow.

Each sampled site masks its weighted, fixed-point adapter with pairwise and private masks; the
server sums the masked vectors and unmasks only the sum (with secret shares from the sites, so a
site that drops out mid-round can still be unmasked away). The server never holds one site's
adapter: the strategy gets the weighted mean (`apply_mean`), which is why only strategies whose
aggregate depends on the replies through that mean alone qualify (`sum_only` in
common/strategy_registry.py).
What stays in the clear: each site's example count and training metrics.

Flower ships SecAgg+ for its legacy strategy API; a one-round legacy strategy hands the workflow
the sites this strategy sampled and takes back the unmasked mean.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping
from typing import TYPE_CHECKING

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord, RecordDict
from flwr.common import FitIns, FitRes, Parameters
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.serverapp import Grid

from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.flower_compat import (
    MAIN_CONFIGS_RECORD,
    MAIN_PARAMS_RECORD,
    ClientProxy,
    GridClientProxy,
    LegacyContext,
    SecAggKey,
)
from common.records import (
    ARRAY_NAMES_KEY,
    NUM_EXAMPLES,
    REPLY_NAMES_KEY,
    REPLY_PER_ROW_KEY,
    adapter_to_record,
    message_bytes,
    parameters_to_record,
    record_to_adapter,
    record_to_parameters,
)
from server.contract import TrainUpdate, check_adapter_values
from server.round_record import REJECTED
from server.strategies.fedavg import LoraFedAvg

if TYPE_CHECKING:
    from server.client_dp import ClientLevelDP

MODULUS_BITS = 32  # SecAgg+ sums masked integers modulo 2**32


def quantization_range(num_sites: int) -> int:
    """The finest fixed-point grid whose sum over num_sites sites (plus the weights) cannot
    wrap around the modulus, and whose values fit numpy's int32 (Flower quantises to it)."""
    return min(2 ** (MODULUS_BITS - num_sites.bit_length()), 2 ** 30)


class ObservedGrid:
    """The Grid the workflow talks to: counts what travels and keeps each site's error."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid
        self.bytes_down = self.bytes_up = 0
        self.errors: dict[int, str] = {}
        self.replied: set[int] = set()

    def send_and_receive(self, messages, timeout=None):
        messages = list(messages)
        self.bytes_down += message_bytes(messages)
        replies = list(self.grid.send_and_receive(messages, timeout=timeout))
        self.bytes_up += message_bytes(replies)
        for reply in replies:
            self.replied.add(reply.metadata.src_node_id)
            if reply.has_error():
                self.errors[reply.metadata.src_node_id] = reply.error.reason
        return replies

    def __getattr__(self, name):
        return getattr(self.grid, name)


class FixedSample(Strategy):
    """A legacy strategy for one SecAgg+ round: the sites and FitIns are chosen already; what
    comes back is the unmasked mean (every FitRes carries the same aggregate)."""

    def __init__(self, grid: Grid, nodes: list[int], fitins: FitIns) -> None:
        super().__init__()
        self.proxies = [GridClientProxy(node, grid, run_id=0) for node in nodes]
        self.fitins = fitins
        self.results: list[tuple[ClientProxy, FitRes]] | None = None

    def configure_fit(self, server_round, parameters, client_manager):
        return [(proxy, self.fitins) for proxy in self.proxies]

    def aggregate_fit(self, server_round, results, failures):
        self.results = list(results)
        return None, {}

    def initialize_parameters(self, client_manager):
        return None

    def configure_evaluate(self, server_round, parameters, client_manager):
        return []

    def aggregate_evaluate(self, server_round, results, failures):
        return None, {}

    def evaluate(self, server_round, parameters):
        return None


class SecAggPlusRound:
    """The training exchange of a round (see federation_loop.plain_exchange) under SecAgg+."""

    def __init__(self, strategy: LoraFedAvg, cfg: FedLoraConfig,
                 client_dp: "ClientLevelDP | None" = None) -> None:
        self.strategy, self.cfg, self.client_dp = strategy, cfg, client_dp

    def __call__(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                 timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        configure = self.client_dp.configure_train if self.client_dp else \
            self.strategy.configure_train
        messages = list(configure(server_round, arrays, config, grid))
        if not messages:
            return None, None
        nodes = [m.metadata.dst_node_id for m in messages]
        content = messages[0].content  # the same record for every sampled site
        names = self.strategy.returned_names()
        results, observed = secure_exchange(
            self.cfg, grid, server_round, nodes, content[self.strategy.arrayrecord_key],
            content[self.strategy.configrecord_key], timeout, reply_names=names)
        stats = self.strategy.round_stats[server_round]
        # Every SecAgg+ message of the round, in place of the adapter bytes counted so far.
        stats.bytes_down += observed.bytes_down - stats.train_bytes_down
        stats.bytes_up += observed.bytes_up
        return self._aggregate(server_round, nodes, results, observed, names)

    def _aggregate(self, server_round: int, nodes: list[int],
                   results: list[tuple[ClientProxy, FitRes]], observed: ObservedGrid,
                   names: list[str]) -> tuple[ArrayRecord | None, MetricRecord | None]:
        strategy, stats = self.strategy, self.strategy.round_stats[server_round]
        for node, reason in unsummed(nodes, results, observed, self.cfg).items():
            strategy.leave_out(server_round, node, reason, "train", REJECTED)
        stats.aggregated = len(results)
        if len(results) < strategy.min_train_nodes:  # at least 2 (config)
            return None, None
        if self.client_dp and len(results) < len(nodes):
            # Client-level DP noise is calibrated to every sampled site's clipped update.
            stats.aggregated = 0
            return None, None
        try:
            mean = decode_secure_mean(results[0][1].parameters, names,
                                      self.strategy.returned_reference())
        except FedLoraError as err:
            for proxy, _ in results:
                strategy.leave_out(server_round, proxy.node_id, f"unusable secure sum: {err}",
                               "train", REJECTED)
            stats.aggregated = 0
            return None, None
        if self.client_dp:
            mean = self.client_dp.add_noise(mean, len(nodes))
            self.client_dp.record_release(server_round)
        updates = [TrainUpdate(node_id=proxy.node_id, state={},
                               num_examples=int(res.metrics.get(NUM_EXAMPLES, res.num_examples)),
                               metrics={k: float(v) for k, v in res.metrics.items()
                                        if isinstance(v, (int, float))},
                               weight=float(res.num_examples))
                   for proxy, res in results]
        aggregated = strategy.keep_fixed(strategy.apply_mean(server_round,
                                                             strategy.with_fixed(mean)))
        return adapter_to_record(aggregated, "float32"), strategy.record_train(server_round,
                                                                               updates)

def decode_secure_mean(parameters: Parameters, names: list[str],
                       reference: Mapping[str, torch.Tensor]) -> "OrderedDict[str, torch.Tensor]":
    """The unmasked mean of a SecAgg+ round as the adapter tensors `names`, held to the same
    contract as a site's reply (server/contract.py)."""
    mean = record_to_adapter(parameters_to_record(parameters, names))
    check_adapter_values(mean, reference, "the secure sum")
    return OrderedDict((name, mean[name]) for name in names)


def secure_exchange(cfg: FedLoraConfig, grid: Grid, server_round: int, nodes: list[int],
                    arrays: ArrayRecord, config: ConfigRecord, timeout: float,
                    reply_names: list[str], per_row: bool = False
                    ) -> tuple[list[tuple[ClientProxy, FitRes]], ObservedGrid]:
    """One SecAgg+ exchange with `nodes`, sending each `arrays` and `config`: the sites that
    made it into the sum, each FitRes holding the unmasked weighted mean of the replies (the
    arrays `reply_names`, in that order), and what travelled. per_row: the replies are sums
    over each site's rows, which the sites send per row (the mean is then their total over
    sites divided by the total weight)."""
    parameters, names = record_to_parameters(arrays)
    fit_config = dict(config)
    fit_config[ARRAY_NAMES_KEY] = names
    fit_config[REPLY_NAMES_KEY] = reply_names
    fit_config[REPLY_PER_ROW_KEY] = per_row
    sample = FixedSample(grid, nodes, FitIns(parameters, fit_config))
    observed = ObservedGrid(grid)
    SecAggPlusWorkflow(
        num_shares=cfg.secagg_shares, reconstruction_threshold=cfg.secagg_threshold,
        max_weight=cfg.secagg_max_weight, clipping_range=cfg.secagg_clipping_range,
        quantization_range=quantization_range(len(nodes)), modulus_range=2 ** MODULUS_BITS,
        timeout=timeout)(observed, _legacy_context(server_round, sample))
    return sample.results or [], observed


def unsummed(nodes: list[int], results: list[tuple[ClientProxy, FitRes]],
             observed: ObservedGrid, cfg: FedLoraConfig) -> dict[int, str]:
    """Why each site that was asked is not in the secure sum."""
    summed = {proxy.node_id for proxy, _ in results}
    reasons = {}
    for node in sorted(set(nodes) - summed):
        if node in observed.errors:
            reasons[node] = f"client failed: {observed.errors[node]}"
        elif node in observed.replied:
            reasons[node] = "secure aggregation halted: too few sites left to unmask the sum"
        else:
            reasons[node] = f"no reply within round-timeout ({cfg.round_timeout:g}s)"
    return reasons


def _legacy_context(server_round: int, strategy: Strategy) -> LegacyContext:
    context = LegacyContext(Context(run_id=0, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}), strategy=strategy)
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord(
        {SecAggKey.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = ArrayRecord()  # the adapter is in FitIns
    return context
