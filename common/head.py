"""The closed-form classification head: sufficient statistics of a site's features, their sum,
and the head solved from the sum.

A site reads the features its head sees (the pooled vector x of each row) and sums, per split:
    gram          sum of x x^T                (H x H)
    class_sums    per class c, sum of x       (C x H)
    class_counts  per class c, how many rows  (C)
Sums of several sites are the sums of their pooled rows, so the head solved from them is the head
of the pooled data, whatever the split of labels over sites.

The head is linear discriminant analysis with a shared, shrunk covariance: class means mu_c, the
within-class covariance Sigma shrunk toward a multiple of the identity by a factor lambda
(scikit-learn's LinearDiscriminantAnalysis(solver="lsqr", shrinkage=lambda)), and
    logit_c(x) = x^T Sigma^-1 mu_c - mu_c^T Sigma^-1 mu_c / 2 + log(n_c / n).
On BANKING77 with the default model it scores 90.4% where a ridge fit on the same sums scores
88.4% (docs/benchmarks.md). lambda is the one on a grid under which the validation rows are
most likely under the fitted Gaussians: a criterion computed from the validation sums alone.
The logits are then divided by a temperature (see CALIBRATED_MARGIN), which changes no
prediction.

Everything here is float64 and pure: no model, no Flower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# Shrinkage factors tried; the validation statistics pick one. Noisy (DP) statistics need
# values near 1 (1 is the nearest class mean under a scaled identity).
SHRINKAGES = (1e-4, 3e-4, 1e-3, 3e-3, 0.01, 0.03, 0.1, 0.3, 0.6, 0.9, 0.97, 0.99, 1.0)
DEFAULT_SHRINKAGE = 0.01  # when no site holds validation rows
# A label no site holds gets weight 0 and a bias this far below the lowest other: never
# predicted, as no site has rows of it to learn from.
ABSENT_LABEL_MARGIN = 20.0
# The logits are divided by a temperature under which the median label's training mean is
# predicted this many nats above the next label (p ~ 0.99). LDA's own logits are far more
# confident (a margin of ~60 nats on BANKING77): softmax saturates, the gradients of rows it
# gets right fall below the optimiser's epsilon and LoRA stops learning. On BANKING77 the
# temperature that minimises the validation rows' cross-entropy is 0.17-0.22 x that margin,
# from 600 to 9,000 rows and at every shrinkage (docs/benchmarks.md).
CALIBRATED_MARGIN = 5.0
_PARTS = ("gram", "class-sums", "class-counts")


@dataclass(frozen=True)
class HeadStatistics:
    gram: torch.Tensor  # H x H
    class_sums: torch.Tensor  # C x H
    class_counts: torch.Tensor  # C

    @classmethod
    def zeros(cls, dim: int, num_labels: int) -> "HeadStatistics":
        f64 = torch.float64
        return cls(torch.zeros(dim, dim, dtype=f64), torch.zeros(num_labels, dim, dtype=f64),
                   torch.zeros(num_labels, dtype=f64))

    @classmethod
    def of(cls, features: torch.Tensor, labels: torch.Tensor, num_labels: int
           ) -> "HeadStatistics":
        """The statistics of rows `features` (n x H) with label ids `labels` (n)."""
        x = features.to(torch.float64)
        onehot = torch.nn.functional.one_hot(labels.long(), num_labels).to(torch.float64)
        return cls(x.T @ x, onehot.T @ x, onehot.sum(0))

    def __add__(self, other: "HeadStatistics") -> "HeadStatistics":
        return HeadStatistics(self.gram + other.gram, self.class_sums + other.class_sums,
                              self.class_counts + other.class_counts)

    def scaled(self, factor: float) -> "HeadStatistics":
        return HeadStatistics(self.gram * factor, self.class_sums * factor,
                              self.class_counts * factor)

    @property
    def dim(self) -> int:
        return self.gram.shape[0]

    @property
    def num_labels(self) -> int:
        return self.class_counts.shape[0]

    @property
    def num_rows(self) -> float:
        return float(self.class_counts.sum())

    def to_arrays(self, prefix: str) -> dict[str, torch.Tensor]:
        """Named float64 arrays; the Gram matrix as its upper triangle (it is symmetric)."""
        rows, cols = torch.triu_indices(self.dim, self.dim)
        return {f"{prefix}.gram": self.gram[rows, cols], f"{prefix}.class-sums": self.class_sums,
                f"{prefix}.class-counts": self.class_counts}

    @classmethod
    def from_arrays(cls, arrays: dict[str, torch.Tensor], prefix: str, dim: int,
                    num_labels: int) -> "HeadStatistics":
        """The inverse of to_arrays; ValueError naming an array that is missing or misshapen."""
        shapes = {"gram": (dim * (dim + 1) // 2,), "class-sums": (num_labels, dim),
                  "class-counts": (num_labels,)}
        values = {}
        for part in _PARTS:
            name = f"{prefix}.{part}"
            if name not in arrays:
                raise ValueError(f"no array {name!r}")
            if tuple(arrays[name].shape) != shapes[part]:
                raise ValueError(f"array {name!r} has shape {tuple(arrays[name].shape)}, "
                                 f"expected {shapes[part]}")
            values[part] = arrays[name].to(torch.float64)
        gram = torch.zeros(dim, dim, dtype=torch.float64)
        rows, cols = torch.triu_indices(dim, dim)
        gram[rows, cols] = values["gram"]
        gram[cols, rows] = values["gram"]
        return cls(gram, values["class-sums"], values["class-counts"])


def array_names(prefixes: tuple[str, ...]) -> list[str]:
    return [f"{prefix}.{part}" for prefix in prefixes for part in _PARTS]


# How a DP release's noise is spread over the three parts, as shares of 1 / z^2 (z the noise
# multiplier): each part's std is z / sqrt(share) times its L2 sensitivity, so the release is one
# Gaussian mechanism of noise multiplier z whatever the shares. The sensitivities, for adding or
# removing one row of norm at most 1: the Gram matrix's upper triangle moves by at most |x|^2,
# the row's label sum by |x|, its count by 1; 1 each. A row is in the training or the validation
# split, never both, so both splits released together have the same sensitivity.
# The per-label sums carry the head and are the fragile part; the Gram matrix sums every row
# into each entry, and a count tolerates noise of a few rows. Measured on BANKING77 at epsilon
# 8 (10 sites): equal shares 67%, these 75%, with the means' shrinkage below 79%.
NOISE_SHARES = {"gram": 0.10, "class-sums": 0.88, "class-counts": 0.02}


def noise_std(noise_multiplier: float, part: str) -> float:
    """The std of the noise a site adds to each number of `part` (rows of norm at most 1)."""
    return noise_multiplier / NOISE_SHARES[part] ** 0.5


def gaussian_noise(stats: HeadStatistics, noise_multiplier: float,
                   generator: torch.Generator) -> HeadStatistics:
    """The statistics as a Gaussian mechanism of `noise_multiplier` releases them (rows of norm
    at most 1): independent noise on every released number, of std noise_std(part) (the Gram
    matrix's upper triangle mirrored, so it stays symmetric)."""
    def noise(shape, part):
        return torch.randn(shape, generator=generator, dtype=torch.float64) * noise_std(
            noise_multiplier, part)

    dim = stats.dim
    rows, cols = torch.triu_indices(dim, dim)
    upper = noise(rows.shape[0], "gram")
    gram = torch.zeros(dim, dim, dtype=torch.float64)
    gram[rows, cols] = upper
    gram[cols, rows] = upper
    return HeadStatistics(stats.gram + gram, stats.class_sums + noise(stats.class_sums.shape,
                                                                      "class-sums"),
                          stats.class_counts + noise(stats.class_counts.shape, "class-counts"))


@dataclass(frozen=True)
class HeadFit:
    weight: torch.Tensor  # C x H, float64, divided by the temperature
    bias: torch.Tensor  # C, float64, divided by the temperature
    shrinkage: float
    temperature: float
    labels_present: int  # labels with at least one training row


def solve_head(train: HeadStatistics, val: HeadStatistics | None = None,
               shrinkages: tuple[float, ...] = SHRINKAGES,
               class_sum_noise: float = 0.0) -> HeadFit:
    """The LDA head of the pooled rows `train`, its shrinkage chosen on `val` (the one that
    makes the validation rows most likely), or without validation rows the least from
    DEFAULT_SHRINKAGE up that gives a positive definite covariance. `class_sum_noise`: the std
    of the noise on each entry of the summed label sums (DP): each label's mean is then shrunk
    toward the mean of all rows by its share of noise (positive-part James-Stein), which leaves
    noise-free statistics as they are.
    Raises ValueError when no shrinkage gives a positive definite covariance (only noise can
    make that happen)."""
    counts = train.class_counts
    # Under DP the counts are noisy: fewer than one row is no class to estimate a mean of.
    present = counts >= 1.0
    if not bool(present.any()):
        raise ValueError("no label has a training row")
    total = float(counts[present].sum())
    means = torch.zeros_like(train.class_sums)
    means[present] = train.class_sums[present] / counts[present, None]
    if class_sum_noise > 0:
        means[present] = shrink_noisy_means(means[present], counts[present], class_sum_noise)
        train = HeadStatistics(train.gram, means * counts.clamp(min=0)[:, None],
                               train.class_counts)
    within = (train.gram - train.class_sums[present].T @ means[present]) / total
    within = (within + within.T) / 2
    eigenvalues, basis = torch.linalg.eigh(within)
    # The identity's share of the trace. Noise can make eigenvalues negative (and the trace
    # small or negative); their mean magnitude is the same number without noise and stays
    # positive with it.
    scale = float(eigenvalues.abs().mean())
    has_val = val is not None and val.num_rows >= 1
    # Without validation rows: the least shrinkage from DEFAULT_SHRINKAGE up that works.
    candidates = shrinkages if has_val else (
        tuple(sorted(x for x in shrinkages if x >= DEFAULT_SHRINKAGE)) or shrinkages)
    if has_val:
        residual = _validation_scatter(val, means)
        rotated = torch.einsum("ij,jk,ki->i", basis.T, residual, basis)
    best: tuple[float, float] | None = None  # (score, shrinkage)
    for shrinkage in candidates:
        diagonal = (1 - shrinkage) * eigenvalues + shrinkage * scale
        if float(diagonal.min()) <= 0:
            continue
        score = 0.0
        if has_val:  # the validation rows' Gaussian log-likelihood, up to constants
            score = -0.5 * (val.num_rows * float(torch.log(diagonal).sum())
                            + float((rotated / diagonal).sum()))
        if best is None or score > best[0]:
            best = (score, shrinkage)
    if best is None:
        raise ValueError("the within-class covariance is not positive definite under any "
                         "shrinkage")
    shrinkage = best[1]
    diagonal = (1 - shrinkage) * eigenvalues + shrinkage * scale
    directions = basis @ ((basis.T @ means.T) / diagonal[:, None])  # Sigma^-1 mu, H x C
    weight = directions.T.clone()
    bias = -0.5 * (means * weight).sum(1) + torch.log(counts.clamp(min=1.0) / total)
    temperature = _temperature(means[present] @ weight[present].T + bias[present])
    weight, bias = weight / temperature, bias / temperature
    weight[~present] = 0.0
    bias[~present] = float(bias[present].min()) - ABSENT_LABEL_MARGIN
    return HeadFit(weight=weight, bias=bias, shrinkage=shrinkage, temperature=temperature,
                   labels_present=int(present.sum()))


def head_state(fit: HeadFit, names: list[str]) -> dict[str, torch.Tensor]:
    """The fit as the model's two head tensors (`names`: the weight's and the bias's), in the
    float32 the adapter holds; ValueError for a head of another shape."""
    biases = [n for n in names if n.endswith("bias")]
    weights = [n for n in names if not n.endswith("bias")]
    if len(biases) != 1 or len(weights) != 1:
        raise ValueError(f"a closed-form head is one weight and one bias; this model's head has "
                         f"{len(names)} tensors")
    return {weights[0]: fit.weight.to(torch.float32), biases[0]: fit.bias.to(torch.float32)}


def _temperature(mean_logits: torch.Tensor) -> float:
    """The temperature that gives the median label's mean a margin of CALIBRATED_MARGIN
    (`mean_logits`: row c holds the logits of label c's mean, for the labels present); 1 when
    there is no other label, or noise made the median mean a wrong prediction."""
    if mean_logits.shape[0] < 2:
        return 1.0
    own = mean_logits.diagonal()
    others = mean_logits.clone()
    others.fill_diagonal_(float("-inf"))
    margin = float((own - others.max(dim=1).values).median())
    return margin / CALIBRATED_MARGIN if margin > 0 else 1.0


def shrink_noisy_means(means: torch.Tensor, counts: torch.Tensor, noise: float) -> torch.Tensor:
    """Each label's mean (of sums with noise of std `noise` on every entry) pulled toward the
    counts-weighted mean of all by the share of its spread that the noise explains, the
    expected squared norm of the noise in a mean of n rows being dim x noise^2 / n^2: the
    positive-part James-Stein estimator, closer to the true means in total squared error."""
    if noise <= 0:
        return means
    overall = (means * counts[:, None]).sum(0) / counts.sum()
    spread = means - overall
    expected = means.shape[1] * noise ** 2 / counts ** 2
    keep = (1 - expected / spread.pow(2).sum(1).clamp(min=1e-300)).clamp(min=0)
    return overall + keep[:, None] * spread


def _validation_scatter(val: HeadStatistics, means: torch.Tensor) -> torch.Tensor:
    """sum over validation rows of (x - mu_y)(x - mu_y)^T, from the validation sums (mu of a
    label without training rows is taken as 0)."""
    cross = val.class_sums.T @ means
    return val.gram - cross - cross.T + (means.T * val.class_counts) @ means
