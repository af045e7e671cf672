"""The head round: every site sends the statistics of its features (common/head.py), the
server sums them and solves for the classification head, which replaces the head of the global
adapter. The federation loop calls it before round 1 (round 0) and, with head-refit-every = K,
after every K-th round's aggregation, on the features of the new global adapter.

How the statistics travel: in the clear, one `query.head_statistics` message per site; or
inside SecAgg+ (secure-aggregation = true), where the server learns only their sum. Under DP
each site adds Gaussian noise to its statistics before they leave it (client/app.py) and counts
the release in its epsilon; the server numbers the releases (`head-releases` in the request), so
that a site's epsilon needs no state on the site.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from logging import INFO, WARNING

import torch
from flwr.app import ArrayRecord, ConfigRecord
from flwr.common import log
from flwr.serverapp import Grid

from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.head import HeadStatistics, array_names, head_state, noise_std, solve_head
from common.message_types import HEAD_ACTION, HEAD_STATISTICS
from common.records import (
    HEAD_RELEASES,
    TASK_KEY,
    adapter_to_record,
    message_bytes,
    record_to_adapter,
)
from server.contract import (
    HEAD_SPLITS,
    HeadReply,
    head_statistics_from,
    parse_head_reply,
    replying_node,
    replying_nodes,
    state_digest,
)
from server.round_record import MISSING, REJECTED
from server.strategies.fedavg import LoraFedAvg

# Sites asked for their statistics at once (see HeadRound._plain). The sums of a federation
# this size or smaller are those of all replies in one fixed order; a larger one's are summed
# batch by batch, its batches made of the sampled nodes in node-id order.
HEAD_BATCH = 64


class HeadRound:
    """Called as refine(grid, server_round, arrays, config, timeout) -> arrays."""

    def __init__(self, strategy: LoraFedAvg, cfg: FedLoraConfig, head_names: list[str],
                 dim: int, num_labels: int, unit_features: bool) -> None:
        if len(head_names) != 2:
            raise FedLoraError(f"a closed-form head is one weight and one bias; this model's "
                               f"head has {len(head_names)} tensors: use head-mode=train")
        self.strategy, self.cfg, self.head_names = strategy, cfg, head_names
        self.dim, self.num_labels = dim, num_labels
        self.unit_features = unit_features
        self.releases = 0  # statistics requests sent so far, each one DP release of every site

    def due(self, server_round: int) -> bool:
        every = self.cfg.head_refit_every
        return server_round == 0 or bool(every and server_round % every == 0)

    def __call__(self, grid: Grid, server_round: int, arrays: ArrayRecord,
                 config: ConfigRecord, timeout: float) -> ArrayRecord:
        if not self.due(server_round):
            self.stamp_releases(config)
            return arrays
        started = time.perf_counter()
        nodes = self.strategy.sample_nodes(grid, 1.0, self.strategy.min_train_nodes)
        down = up = 0  # over every attempt
        for attempt in range(self.cfg.round_retries + 1):
            self.releases += 1
            request = ConfigRecord({**dict(config), "server-round": server_round,
                                    HEAD_RELEASES: self.releases})
            sums, sites, traffic = (self._secure(grid, server_round, nodes, arrays, request,
                                                 timeout) if self.cfg.secure_aggregation
                                    else self._plain(grid, server_round, nodes, arrays, request,
                                                     timeout))
            down, up = down + traffic["bytes-down"], up + traffic["bytes-up"]
            if sites >= self.strategy.min_train_nodes:
                break
            log(WARNING, "round %s: head statistics from %s sites, %s needed (attempt %s of "
                "%s)", server_round, sites, self.strategy.min_train_nodes, attempt + 1,
                self.cfg.round_retries + 1)
        else:
            raise FedLoraError(
                f"round {server_round}: head statistics from only {sites} sites, at least "
                f"{self.strategy.min_train_nodes} needed, after {self.cfg.round_retries + 1} "
                f"attempts")
        self.stamp_releases(config)
        train, val = sums
        # Under DP each summed label-sum entry carries every summed site's noise.
        noise = (noise_std(self.cfg.head_noise_multiplier, "class-sums") * sites ** 0.5
                 if self.noisy else 0.0)
        try:
            fit = solve_head(train, val, class_sum_noise=noise)
        except ValueError as err:
            raise FedLoraError(f"round {server_round}: the head cannot be solved from the "
                               f"sites' statistics: {err}") from None
        state = record_to_adapter(arrays)
        state.update(head_state(fit, self.head_names))
        stats = self.strategy.round_stats[server_round]
        stats.bytes_down += down
        stats.bytes_up += up
        traffic.update({"bytes-down": down, "bytes-up": up})
        stats.head = {
            "sites": sites, "rows": train.num_rows, "val-rows": val.num_rows,
            "labels-present": fit.labels_present, "shrinkage": fit.shrinkage,
            "temperature": fit.temperature,
            "secure": self.cfg.secure_aggregation, "seconds": time.perf_counter() - started,
            **traffic}
        log(INFO, "round %s: head fitted on %s sites' statistics (%s rows, shrinkage %g)",
            server_round, sites, int(train.num_rows), fit.shrinkage)
        return adapter_to_record(state, "float32")

    def _plain(self, grid: Grid, server_round: int, nodes: list[int], arrays: ArrayRecord,
               request: ConfigRecord, timeout: float):
        """Asked HEAD_BATCH sites at a time and summed batch by batch: the server holds one
        batch's replies, not every site's (1,000 sites' statistics at once took 4+ GiB with
        the default model). Within a batch the replies are summed in a fixed order, so the
        float sums do not depend on the order they arrived in."""
        deadline = time.monotonic() + timeout
        train = HeadStatistics.zeros(self.dim, self.num_labels)
        val = HeadStatistics.zeros(self.dim, self.num_labels)
        sites, down, up, asked, replied, epsilons = 0, 0, 0, 0, 0, []
        for start in range(0, len(nodes), HEAD_BATCH):
            batch = nodes[start:start + HEAD_BATCH]
            messages = self.strategy.build_messages(server_round, arrays, request, batch,
                                                    HEAD_STATISTICS)
            replies = list(grid.send_and_receive(
                messages=messages, timeout=max(deadline - time.monotonic(), 0.0)))
            requests = replying_nodes(messages)
            for node in sorted(set(batch) - {replying_node(m, requests) for m in replies}):
                self.strategy.leave_out(server_round, node, f"no head statistics within "
                                        f"round-timeout ({self.cfg.round_timeout:g}s)",
                                        "head", MISSING)
            parsed: list[HeadReply] = []
            for msg in replies:
                try:
                    parsed.append(parse_head_reply(msg, self.dim, self.num_labels,
                                                   noisy=self.noisy,
                                                   unit_features=self.unit_features))
                except FedLoraError as err:
                    self.strategy.leave_out(server_round, replying_node(msg, requests),
                                            str(err), "head", REJECTED)
            parsed.sort(key=lambda r: (r.num_examples, state_digest(
                OrderedDict(r.train.to_arrays("train")))))
            for reply in parsed:
                train, val = train + reply.train, val + reply.val
            epsilons += [r.metrics["dp-epsilon"] for r in parsed if "dp-epsilon" in r.metrics]
            sites += len(parsed)
            down, up = down + message_bytes(messages), up + message_bytes(replies)
            asked, replied = asked + len(messages), replied + len(replies)
        traffic = _traffic(down, up, asked, replied)
        if epsilons:
            traffic["dp-epsilon"] = max(epsilons)
        return (train, val), sites, traffic

    def _secure(self, grid: Grid, server_round: int, nodes: list[int], arrays: ArrayRecord,
                request: ConfigRecord, timeout: float):
        from server.secure_aggregation import secure_exchange, unsummed

        request[TASK_KEY] = HEAD_ACTION
        outgoing = self.strategy.outgoing(arrays)
        results, observed = secure_exchange(self.cfg, grid, server_round, nodes, outgoing,
                                            request, timeout,
                                            reply_names=array_names(HEAD_SPLITS), per_row=True)
        for node, reason in unsummed(nodes, results, observed, self.cfg).items():
            self.strategy.leave_out(server_round, node, reason, "head", REJECTED)
        traffic = _traffic(observed.bytes_down, observed.bytes_up, len(nodes),
                           len(observed.replied))
        if not results:
            empty = HeadStatistics.zeros(self.dim, self.num_labels)
            return (empty, empty), 0, traffic
        rows = sum(res.num_examples for _, res in results)
        mean = _decode_secure_mean(results[0][1].parameters, rows)
        try:
            sums = head_statistics_from(mean, self.dim, self.num_labels)
        except FedLoraError as err:
            for proxy, _ in results:
                self.strategy.leave_out(server_round, proxy.node_id,
                                        f"unusable secure sum: {err}", "head", REJECTED)
            empty = HeadStatistics.zeros(self.dim, self.num_labels)
            return (empty, empty), 0, traffic
        epsilons = [float(res.metrics["dp-epsilon"]) for _, res in results
                    if "dp-epsilon" in res.metrics]
        if epsilons:
            traffic["dp-epsilon"] = max(epsilons)
        return sums, len(results), traffic

    def stamp_releases(self, config: ConfigRecord) -> None:
        """Tell the sites, in the config their training messages carry, how many head
        statistics they have released: DP-SGD composes its epsilon with theirs."""
        config[HEAD_RELEASES] = self.releases

    @property
    def noisy(self) -> bool:
        return self.cfg.private_head

    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"head-round": {"releases": torch.tensor([self.releases])}}

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        if "head-round" in state:
            self.releases = int(state["head-round"]["releases"][0])


def _traffic(down: int, up: int, asked: int, replied: int) -> dict[str, float]:
    return {"bytes-down": down, "bytes-up": up,
            "bytes-down-per-site": down / max(asked, 1), "bytes-up-per-site": up / max(replied, 1)}


def _decode_secure_mean(parameters, rows: int) -> dict[str, torch.Tensor]:
    """The statistics' totals from SecAgg+'s weighted mean of per-row statistics."""
    from common.records import parameters_to_record, record_to_tensors

    names = array_names(HEAD_SPLITS)
    arrays = record_to_tensors(parameters_to_record(parameters, names))
    return {name: tensor.to(torch.float64) * rows for name, tensor in arrays.items()}
