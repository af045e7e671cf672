"""Client-level differential privacy: Flower's fixed-clipping wrappers around a fedlora strategy,
accounted with Flower's RDP accountant.

Each sampled site's update (its adapter minus the global one) is clipped to L2 norm
client-dp-clip-norm, on the site by Flower's `fixedclipping_mod` (client-dp-clipping=client) or
on the server (=server); the strategy averages the clipped updates with equal weights and the
wrapper adds Gaussian noise of std noise-multiplier * clip-norm / sampled sites to the mean. One
such noisy mean is one release of a Gaussian mechanism whose neighbouring data sets differ in
one whole site; the accountant composes the releases (no amplification by sampling is claimed).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import (
    DifferentialPrivacyClientSideFixedClipping,
    DifferentialPrivacyServerSideFixedClipping,
)

from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.flower_compat import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    RdpAccountant,
    SamplingMethod,
    add_gaussian_noise_inplace,
    compute_stdv,
)
from server.contract import parse_train_reply
from server.federation_loop import Stop, StopReason
from server.strategies.fedavg import LoraFedAvg

# Without amplification by sampling the population only has to bound the sample size.
POPULATION = 1_000_000


class ClientLevelDP:
    """The training exchange of a round (see federation_loop.plain_exchange) under
    client-level DP."""

    def __init__(self, strategy: LoraFedAvg, cfg: FedLoraConfig) -> None:
        wrapper = (DifferentialPrivacyClientSideFixedClipping if cfg.client_dp_clipping == "client"
                   else DifferentialPrivacyServerSideFixedClipping)
        # Flower's wrapper accounts only around FedAvg.aggregate_train itself; the same
        # accountant is composed here, once per noisy mean actually released.
        self.wrapper = wrapper(strategy, cfg.client_dp_noise_multiplier, cfg.client_dp_clip_norm,
                               num_sampled_clients=1)
        self.strategy = strategy
        self.cfg = cfg
        self.accountant = RdpAccountant(PrivacyConfig(
            target_delta=cfg.client_dp_delta, population_size=POPULATION,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE,
            sampling_method=SamplingMethod.NO_AMPLIFICATION,
            max_epsilon=cfg.client_dp_target_epsilon or None))
        self._event: GaussianPrivacyEvent | None = None
        # Set when one more release would exceed client-dp-target-epsilon: the run ends.
        self.budget_stop: Stop | None = None

    def __call__(self, grid: Grid, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                 timeout: float) -> tuple[ArrayRecord | None, MetricRecord | None]:
        messages = self.configure_train(server_round, arrays, config, grid)
        if not messages:
            return None, None
        replies = grid.send_and_receive(messages=messages, timeout=timeout)
        return self.aggregate_train(server_round, replies)

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> list[Message]:
        """The wrapper's messages (with the clip norm for the sites' mod), or none when the
        release they lead to would exceed client-dp-target-epsilon."""
        messages = list(self.wrapper.configure_train(server_round, arrays, config, grid))
        if messages and not self.allow_release(len(messages)):
            return []
        self.wrapper.num_sampled_clients = max(len(messages), 1)
        return messages

    def allow_release(self, sampled: int) -> bool:
        self._event = GaussianPrivacyEvent(noise_multiplier=self.cfg.client_dp_noise_multiplier,
                                           sample_size=sampled, population_size=POPULATION)
        target = self.cfg.client_dp_target_epsilon
        if target and self.accountant.would_exceed(self._event):
            self.budget_stop = Stop(StopReason.CLIENT_DP_BUDGET, (
                f"one more release would exceed client-dp-target-epsilon ({target:g}; spent "
                f"{self.epsilon():.3f})"))
            return False
        return True

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        replies = list(replies)
        if not all(self._usable(msg) for msg in replies):
            # The wrapper would skip a failed site silently, and its server-side clipping
            # crashes on a malformed update: the strategy names each site it leaves out and,
            # missing a sampled update, releases nothing (server/contract.py ClientDPAdmission).
            return self.strategy.aggregate_train(server_round, replies)
        _fresh_noise()
        arrays, metrics = self.wrapper.aggregate_train(server_round, replies)
        if arrays is not None:
            self.record_release(server_round)
        return arrays, metrics

    def _usable(self, msg: Message) -> bool:
        try:
            parse_train_reply(msg, self.strategy.reference, current=self.strategy.current)
        except FedLoraError:
            return False
        return True

    def add_noise(self, mean: dict[str, torch.Tensor], sampled: int) -> dict[str, torch.Tensor]:
        """What the wrapper does to an aggregate it has not computed itself (secure aggregation)."""
        arrays = [t.detach().cpu().numpy().copy() for t in mean.values()]
        _fresh_noise()
        add_gaussian_noise_inplace(arrays, compute_stdv(self.cfg.client_dp_noise_multiplier,
                                                        self.cfg.client_dp_clip_norm, sampled))
        return {name: torch.from_numpy(a) for name, a in zip(mean, arrays)}

    def record_release(self, server_round: int) -> None:
        self.accountant.compose(self._event)
        self.strategy.round_stats[server_round].client_dp = {
            "epsilon": self.epsilon(), "delta": self.cfg.client_dp_delta,
            "releases": self.accountant.num_releases,
            "noise-std": compute_stdv(self.cfg.client_dp_noise_multiplier,
                                      self.cfg.client_dp_clip_norm, self._event.sample_size)}

    def epsilon(self) -> float:
        return self.accountant.get_privacy_spent().epsilon if self.accountant.num_releases else 0.0

    # -- checkpoints: the releases so far (every release has the same noise multiplier) -----
    def state_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        return {"client-dp": {"releases": torch.tensor([self.accountant.num_releases])}}

    def load_state_tensors(self, state: dict[str, dict[str, torch.Tensor]]) -> None:
        releases = int(state.get("client-dp", {}).get("releases", torch.tensor([0]))[0])
        if releases:
            self.accountant.compose(GaussianPrivacyEvent(
                noise_multiplier=self.cfg.client_dp_noise_multiplier, sample_size=1,
                population_size=POPULATION), count=releases)


def _fresh_noise() -> None:
    """Flower's noise comes from numpy's global generator; seed it from the OS, so that no
    library's earlier seeding (or the run's seed) makes the noise predictable."""
    np.random.seed(None)
