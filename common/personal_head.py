"""A site's personal classification head in closed form: its own least-squares fit of the rows
it holds, pulled toward the global head.

With Phi the site's training rows' head features with a 1 appended (n x (H+1)), Y their one-hot
labels centred over the C labels, Theta_g the global head (weight and bias as one (H+1) x C
matrix, centred over the labels, which changes no softmax and no prediction), and
lambda = mu * trace(Phi^T Phi) / (H+1), the personal head solves

    (Phi^T Phi + lambda I) Theta = s Phi^T Y + lambda Theta_g.

mu = 0 is the site's own least-squares fit, mu -> infinity the global head. `s` puts the one-hot
targets in the global head's units (its logits are calibrated to a margin of a few nats,
common/head.py): s Y is as large (Frobenius norm) as the global head's logits on the site's
rows, so the fit and the pull weigh numbers of one scale. Nothing here needs another site's
data: the global head and the site's own rows are all a site has.

Under label skew most of what the global head gets wrong on a site is its prior: it weighs
labels the site hardly sees as often as the pooled data does. So the head it is pulled toward
may first have its biases moved by w x the site's log label prior (w = 0: the global head as
sent), the Bayes correction for a shift of the label distribution alone.

mu and w are chosen per site by k-fold cross-validation on its training rows (its validation
rows stay held out for reporting), repeated on CV_REPEATS shuffles, mu among MU_GRID and
infinity (the anchor itself), w among PRIOR_WEIGHTS, by the one-standard-error rule: of the
pairs whose accuracy is within one standard error of the best, the one nearest the global head
(the larger mu, then the smaller w). A site moves away from the global head only for a gain its
rows can tell from chance: on a site whose labels are like the pooled data's, a plain argmax
took a prior shift that cost it 3 points on its held-out rows (docs/benchmarks.md). The site's
local-only head is the same fit with no global head to pull toward (a ridge toward zero, its
strength chosen by the plain argmax, ties to the stronger ridge, no prior).

Everything here is float64 and pure: no model, no Flower.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

MU_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0)  # besides infinity: the global head
RIDGE_GRID = (1e-4, 1e-3, 1e-2, 0.1, 1.0)  # a local-only head's pull toward zero
FOLDS = 5
CV_REPEATS = 3  # shuffles of the k folds: one split alone decided a few sites' choice
# How much of the site's log label prior may move the global head's biases (0: not at all).
PRIOR_WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)
PRIOR_SMOOTHING = 0.5  # rows added to every label's count before taking the log


@dataclass(frozen=True)
class LinearHead:
    weight: torch.Tensor  # C x H
    bias: torch.Tensor  # C

    @classmethod
    def zeros(cls, num_labels: int, dim: int) -> "LinearHead":
        return cls(torch.zeros(num_labels, dim, dtype=torch.float64),
                   torch.zeros(num_labels, dtype=torch.float64))

    @classmethod
    def from_theta(cls, theta: torch.Tensor) -> "LinearHead":
        return cls(theta[:-1].T.contiguous(), theta[-1].clone())

    @property
    def theta(self) -> torch.Tensor:
        """(H+1) x C, centred over the labels."""
        theta = torch.cat([self.weight.T, self.bias[None, :]]).to(torch.float64)
        return theta - theta.mean(dim=1, keepdim=True)

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        return features.to(torch.float64) @ self.weight.to(torch.float64).T + self.bias


@dataclass(frozen=True)
class PersonalFit:
    head: LinearHead
    mu: float  # math.inf: the global head itself
    prior_weight: float  # how much of the site's log label prior moved the anchor


def _augmented(features: torch.Tensor) -> torch.Tensor:
    x = features.to(torch.float64)
    return torch.cat([x, torch.ones(x.shape[0], 1, dtype=torch.float64)], dim=1)


def _targets(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    onehot = torch.nn.functional.one_hot(labels.long(), num_labels).to(torch.float64)
    return onehot - 1.0 / num_labels


class _Solver:
    """Phi^T Phi of some rows, diagonalised once, so that every mu and anchor costs a few
    products."""

    def __init__(self, phi: torch.Tensor, targets: torch.Tensor) -> None:
        gram = phi.T @ phi
        self.eigenvalues, self.basis = torch.linalg.eigh((gram + gram.T) / 2)
        self.unit = float(torch.trace(gram)) / gram.shape[0]  # lambda per unit of mu
        self.phi, self.rhs = phi, phi.T @ targets
        self.targets_norm = max(float(targets.norm()), 1e-300)

    def solve(self, mu: float, anchor: torch.Tensor) -> torch.Tensor:
        if math.isinf(mu):
            return anchor
        # The scale s of the targets: s Y as large as the anchor's logits on these rows (their
        # size, not their fit: a poor global head must not shrink the site's own targets).
        size = float((self.phi @ anchor).norm()) / self.targets_norm
        scale = size if size > 0 else 1.0
        lam = mu * self.unit
        rhs = scale * self.rhs + lam * anchor
        inverse = 1.0 / (self.eigenvalues + lam).clamp(min=1e-12 * max(self.unit, 1e-300))
        return self.basis @ (inverse[:, None] * (self.basis.T @ rhs))


def label_log_prior(labels: torch.Tensor, num_labels: int) -> torch.Tensor:
    """log of each label's share of the rows, smoothed by PRIOR_SMOOTHING rows per label."""
    counts = torch.bincount(labels.long(), minlength=num_labels).to(torch.float64)
    return torch.log((counts + PRIOR_SMOOTHING) / (counts.sum() + PRIOR_SMOOTHING * num_labels))


def shifted(theta: torch.Tensor, log_prior: torch.Tensor, weight: float) -> torch.Tensor:
    """The head with `weight` x the site's log label prior added to its biases."""
    if weight == 0:
        return theta
    moved = theta.clone()
    moved[-1] += weight * (log_prior - log_prior.mean())
    return moved


def fit_personal_head(features: torch.Tensor, labels: torch.Tensor, anchor: LinearHead,
                      mu: float, prior_weight: float = 0.0) -> LinearHead:
    """The head of rows `features` (n x H) with label ids `labels`, pulled toward `anchor`
    (its biases moved by prior_weight x the rows' log label prior) by `mu` (>= 0; math.inf
    is that anchor itself)."""
    if mu < 0:
        raise ValueError(f"mu must be >= 0, got {mu}")
    num_labels = anchor.bias.shape[0]
    target = shifted(anchor.theta, label_log_prior(labels, num_labels), prior_weight)
    theta = _Solver(_augmented(features), _targets(labels, num_labels)).solve(mu, target)
    return LinearHead.from_theta(theta)


def choose_personal_head(features: torch.Tensor, labels: torch.Tensor, anchor: LinearHead,
                         grid: tuple[float, ...] = MU_GRID, folds: int = FOLDS,
                         seed: int = 0, keep_anchor: bool = True,
                         prior_weights: tuple[float, ...] = PRIOR_WEIGHTS,
                         within_se: float = 1.0, repeats: int = CV_REPEATS) -> PersonalFit:
    """The (prior weight, mu) pair of `prior_weights` x (`grid` and infinity when
    keep_anchor) whose heads predict held-out folds of the rows best, up to `within_se`
    standard errors (see `nearest_within`), and the head of all rows under it. With fewer rows
    than folds, the anchor (or, without one, the largest mu of the grid)."""
    n, num_labels = features.shape[0], anchor.bias.shape[0]
    mus = tuple(sorted(grid)) + ((math.inf,) if keep_anchor else ())
    candidates = [(weight, mu) for weight in sorted(prior_weights) for mu in mus]
    phi, targets = _augmented(features), _targets(labels, num_labels)
    theta_g = anchor.theta
    correct = {candidate: 0 for candidate in candidates}
    if n >= folds:
        for repeat in range(repeats):
            generator = torch.Generator().manual_seed(seed + repeat)
            order = torch.randperm(n, generator=generator)
            for fold in range(folds):
                held = order[fold::folds]
                kept = torch.ones(n, dtype=torch.bool)
                kept[held] = False
                solver = _Solver(phi[kept], targets[kept])
                log_prior = label_log_prior(labels[kept], num_labels)
                for weight, mu in candidates:
                    theta = solver.solve(mu, shifted(theta_g, log_prior, weight))
                    predicted = (phi[held] @ theta).argmax(dim=1)
                    correct[(weight, mu)] += int((predicted == labels[held].long()).sum())
    weight, mu = nearest_within(correct, max(n, 1), repeats, within_se)
    theta = _Solver(phi, targets).solve(mu, shifted(theta_g, label_log_prior(labels, num_labels),
                                                    weight))
    return PersonalFit(LinearHead.from_theta(theta), mu, weight)


def nearest_within(correct: dict[tuple[float, float], int], rows: int, repeats: int,
                   within_se: float) -> tuple[float, float]:
    """The one-standard-error rule: of the (prior weight, mu) pairs whose held-out hits
    (`correct`, over `repeats` passes of `rows` rows) are within `within_se` standard errors of
    the best pair's, the one nearest the global head: the largest mu, then the smallest weight.
    The standard error is the best accuracy's over `rows` rows (at least one row's worth)."""
    best = max(correct.values())
    accuracy_best = best / (rows * repeats)
    variance = max(accuracy_best * (1 - accuracy_best), 1 / rows) / rows
    tolerance = within_se * math.sqrt(variance) * rows * repeats
    eligible = [pair for pair, hits in correct.items() if hits >= best - tolerance]
    return max(eligible, key=lambda pair: (pair[1], -pair[0]))


def choose_local_head(features: torch.Tensor, labels: torch.Tensor, num_labels: int,
                      seed: int = 0) -> PersonalFit:
    """The site alone: its own ridge fit (pulled toward zero), the ridge chosen as mu is."""
    anchor = LinearHead.zeros(num_labels, features.shape[1])
    return choose_personal_head(features, labels, anchor, grid=RIDGE_GRID, seed=seed,
                                keep_anchor=False, prior_weights=(0.0,), within_se=0.0)


def accuracy(head: LinearHead, features: torch.Tensor, labels: torch.Tensor) -> float:
    if features.shape[0] == 0:
        return math.nan
    return float((head.logits(features).argmax(dim=1) == labels.long()).double().mean())
