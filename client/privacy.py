"""Example-level differential privacy on a site: DP-SGD with Opacus on the trainable (LoRA +
head) parameters, noise on the head statistics it releases, and the ε both spend, from Opacus'
RDP accountant.

Each step samples every example independently with probability q = batch-size / n (Poisson
sampling, what the accountant assumes), clips each example's gradient to dp-clip-norm and adds
Gaussian noise of std dp-noise-multiplier * dp-clip-norm to the sum.

The ε reported counts every training release the server asked for so far (rounds, plus retried
rounds) as one of this site's: exact when every site trains every round, an upper bound
otherwise. It needs no state on the site, so it stays right after a restarted SuperNode.

The sample and the noise come from the operating system's randomness on the site, never from
the run's seed: the coordinator knows the seed, and noise it can re-draw protects nothing.
"""

from __future__ import annotations

import os
import warnings

import torch

from client.training import planned_steps
from common.config import FedLoraConfig
from common.data import collate
from common.errors import PRIVACY_BUDGET_REACHED, FedLoraError
from common.head import HeadStatistics, gaussian_noise
from common.model import autocast


class PrivacyBudgetExhausted(FedLoraError):
    """Training this round would spend more than dp-target-epsilon."""


def sample_rate(num_examples: int, cfg: FedLoraConfig) -> float:
    return min(1.0, cfg.batch_size / num_examples)


def epsilon_after(releases: int, num_examples: int, cfg: FedLoraConfig,
                  head_releases: int = 0) -> float:
    """ε spent by this site after `releases` rounds of DP-SGD and `head_releases` releases of
    its noisy head statistics (each a Gaussian mechanism of noise multiplier
    head-dp-noise-multiplier on all its rows), composed in one RDP accountant."""
    from opacus.accountants import RDPAccountant

    history = []
    if cfg.differential_privacy and releases > 0:
        history.append((cfg.dp_noise_multiplier, sample_rate(num_examples, cfg),
                        planned_steps(num_examples, cfg) * releases))
    if cfg.private_head and head_releases > 0:
        history.append((cfg.head_noise_multiplier, 1.0, head_releases))
    if not history:
        return 0.0
    accountant = RDPAccountant()
    accountant.history = history
    return float(accountant.get_epsilon(cfg.dp_delta))


def check_budget(epsilon: float, spent: float, cfg: FedLoraConfig, what: str) -> None:
    """PrivacyBudgetExhausted when releasing `what` would bring this site to `epsilon` (from
    `spent`) beyond dp-target-epsilon."""
    if cfg.dp_target_epsilon and epsilon > cfg.dp_target_epsilon:
        raise PrivacyBudgetExhausted(
            f"{PRIVACY_BUDGET_REACHED}: {what} would bring this site to epsilon={epsilon:.2f} > "
            f"dp-target-epsilon {cfg.dp_target_epsilon:g} (spent: {spent:.2f}); this site "
            f"releases no more")


def train_adapter_private(model: torch.nn.Module, examples: list[dict], cfg: FedLoraConfig, *,
                          releases: int, seed: int, pad_id: int, device: torch.device,
                          head_releases: int = 0) -> dict:
    """DP-SGD in place, as the site's `releases`-th training release (after `head_releases`
    releases of head statistics); the stats say the ε spent with it. Refuses (raises
    PrivacyBudgetExhausted, nothing trained) when that would exceed dp-target-epsilon. `seed`
    drives LoRA dropout only."""
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    n = len(examples)
    epsilon = epsilon_after(releases, n, cfg, head_releases)
    check_budget(epsilon, epsilon_after(releases - 1, n, cfg, head_releases), cfg,
                 f"training release {releases}")
    torch.manual_seed(seed)  # LoRA dropout
    model.train()  # Opacus sees no activations in eval mode
    params = [p for p in model.parameters() if p.requires_grad]
    q = sample_rate(n, cfg)
    private = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay),
        noise_multiplier=cfg.dp_noise_multiplier, max_grad_norm=cfg.dp_clip_norm,
        expected_batch_size=max(1, round(q * n)), loss_reduction="mean",
        generator=torch.Generator(device=device).manual_seed(_site_secret_seed()))
    sampler = torch.Generator().manual_seed(_site_secret_seed())
    steps, loss_sum, seen = planned_steps(n, cfg), 0.0, 0
    try:
        for _ in range(steps):
            chosen = (torch.rand(n, generator=sampler) < q).nonzero().flatten().tolist()
            if not chosen:
                # P = (1-q)^n, about e^-batch-size: negligible; the step is skipped.
                continue
            batch = {k: v.to(device) for k, v in
                     collate([examples[i] for i in chosen], pad_id).items()}
            with autocast(device):
                loss = private(**batch).loss.float()
            with warnings.catch_warnings():  # frozen embeddings: no input needs a gradient
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss_sum += loss.detach().item() * len(chosen)
            seen += len(chosen)
    finally:
        private._close()  # hooks off: evaluation and the next round see the plain model
        for p in params:
            p.grad = None
    return {"loss": loss_sum / max(seen, 1), "steps": steps, "examples-seen": seen,
            "epsilon": epsilon}


def _site_secret_seed() -> int:
    return int.from_bytes(os.urandom(8), "little")


def release_head_statistics(splits: list[HeadStatistics], num_examples: int,
                            cfg: FedLoraConfig, releases: int, train_releases: int
                            ) -> tuple[list[HeadStatistics], float]:
    """The site's head statistics as it may release them as its `releases`-th release of head
    statistics (after `train_releases` of DP-SGD): a Gaussian mechanism of noise multiplier
    head-dp-noise-multiplier on rows of norm at most 1 (common/head.py's gaussian_noise), and
    the ε spent with it. Refuses (PrivacyBudgetExhausted) beyond dp-target-epsilon."""
    epsilon = epsilon_after(train_releases, num_examples, cfg, releases)
    check_budget(epsilon, epsilon_after(train_releases, num_examples, cfg, releases - 1), cfg,
                 f"head statistics release {releases}")
    generator = torch.Generator().manual_seed(_site_secret_seed())
    return [gaussian_noise(stats, cfg.head_noise_multiplier, generator)
            for stats in splits], epsilon
