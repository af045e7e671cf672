"""The closed-form head's math (common/head.py) against references: sums of sites against the
pooled rows, the solve against scikit-learn's LDA, the shrinkage choice against the
validation rows' likelihood computed row by row, the DP noise, its sensitivity bound and the
shrinkage of noisy means."""

from __future__ import annotations

import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from common.head import (
    ABSENT_LABEL_MARGIN,
    CALIBRATED_MARGIN,
    NOISE_SHARES,
    HeadStatistics,
    gaussian_noise,
    noise_std,
    shrink_noisy_means,
    solve_head,
)

DIM, LABELS = 12, 5


def _rows(n: int, seed: int, labels: int = LABELS) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit-length features around one centre per label, float64; the spread differs by
    direction (as real features' does), so the covariance matters."""
    generator = torch.Generator().manual_seed(seed)
    centres = torch.randn(labels, DIM, generator=torch.Generator().manual_seed(0),
                          dtype=torch.float64)
    y = torch.randint(0, labels, (n,), generator=generator)
    spread = torch.linspace(0.1, 2.0, DIM, dtype=torch.float64)
    x = centres[y] + spread * torch.randn(n, DIM, generator=generator, dtype=torch.float64)
    return torch.nn.functional.normalize(x, dim=1), y


def test_summed_statistics_of_skewed_sites_equal_the_pooled_rows():
    x, y = _rows(600, seed=1)
    # Four sites, each holding one or two labels only (the worst label skew), unequal sizes.
    sites = [y == 0, (y == 1) | (y == 2), y == 3, y == 4]
    summed = HeadStatistics.zeros(DIM, LABELS)
    for rows in sites:
        summed = summed + HeadStatistics.of(x[rows], y[rows], LABELS)
    pooled = HeadStatistics.of(x, y, LABELS)
    assert torch.allclose(summed.gram, pooled.gram, rtol=0, atol=1e-12)
    assert torch.allclose(summed.class_sums, pooled.class_sums, rtol=0, atol=1e-12)
    assert torch.equal(summed.class_counts, pooled.class_counts)
    # What travels (the Gram matrix as its upper triangle) holds all of it.
    back = HeadStatistics.from_arrays(summed.to_arrays("train"), "train", DIM, LABELS)
    assert torch.equal(back.gram, summed.gram) and torch.equal(back.class_sums,
                                                               summed.class_sums)


@pytest.mark.parametrize("shrinkage", [0.01, 0.3])
def test_the_head_of_summed_statistics_is_sklearns_lda_of_the_pooled_rows(shrinkage):
    x, y = _rows(500, seed=2)
    halves = [y < 2, y >= 2]
    summed = sum((HeadStatistics.of(x[h], y[h], LABELS) for h in halves),
                 HeadStatistics.zeros(DIM, LABELS))
    fit = solve_head(summed, HeadStatistics.of(x[:50], y[:50], LABELS), shrinkages=(shrinkage,))

    reference = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(x, y)
    assert fit.shrinkage == shrinkage
    weight, bias = fit.weight * fit.temperature, fit.bias * fit.temperature
    assert torch.allclose(weight, torch.from_numpy(reference.coef_), rtol=1e-8, atol=1e-8)
    assert torch.allclose(bias, torch.from_numpy(reference.intercept_), rtol=1e-8, atol=1e-8)
    logits = x @ fit.weight.T + fit.bias
    assert (logits.argmax(1).numpy() == reference.predict(x.numpy())).all()


def test_the_temperature_gives_the_median_label_mean_the_calibrated_margin():
    x, y = _rows(400, seed=10)
    fit = solve_head(HeadStatistics.of(x, y, LABELS))
    means = torch.stack([x[y == c].mean(0) for c in range(LABELS)])
    logits = means @ fit.weight.T + fit.bias
    margins = logits.diagonal() - logits.masked_fill(torch.eye(LABELS, dtype=torch.bool),
                                                     float("-inf")).max(1).values
    assert float(margins.median()) == pytest.approx(CALIBRATED_MARGIN)
    assert fit.temperature > 1  # LDA's own logits are more confident than that


def test_the_shrinkage_chosen_makes_the_validation_rows_most_likely():
    x, y = _rows(120, seed=3)  # few rows for 12 dimensions: shrinkage matters
    val_x, val_y = _rows(400, seed=4)
    train = HeadStatistics.of(x, y, LABELS)
    grid = (0.001, 0.01, 0.1, 0.4, 0.8)

    def loglik(shrinkage: float) -> float:  # row by row, with torch's Gaussian
        means = torch.stack([x[y == c].mean(0) for c in range(LABELS)])
        within = sum(((x[y == c] - means[c]).T @ (x[y == c] - means[c]) for c in range(LABELS)),
                     torch.zeros(DIM, DIM, dtype=torch.float64)) / len(y)
        covariance = (1 - shrinkage) * within + shrinkage * within.trace() / DIM * torch.eye(
            DIM, dtype=torch.float64)
        gaussian = torch.distributions.MultivariateNormal(means[val_y],
                                                          covariance_matrix=covariance)
        return float(gaussian.log_prob(val_x).sum())

    best = max(grid, key=loglik)
    assert solve_head(train, HeadStatistics.of(val_x, val_y, LABELS), grid).shrinkage == best
    assert best not in (grid[0], grid[-1])  # the criterion has an interior optimum here


def test_a_label_no_site_holds_is_never_predicted():
    x, y = _rows(300, seed=5, labels=LABELS - 1)  # the last label has no rows
    fit = solve_head(HeadStatistics.of(x, y, LABELS))
    assert fit.labels_present == LABELS - 1
    assert torch.equal(fit.weight[-1], torch.zeros(DIM, dtype=torch.float64))
    assert float(fit.bias[-1]) == pytest.approx(float(fit.bias[:-1].min()) - ABSENT_LABEL_MARGIN)
    assert ((x @ fit.weight.T + fit.bias).argmax(1) != LABELS - 1).all()


def test_noise_has_each_parts_std_and_the_release_is_one_mechanism_of_the_multiplier():
    zero = HeadStatistics.zeros(60, 400)
    noisy = gaussian_noise(zero, 1.5, generator=torch.Generator().manual_seed(7))
    for part, values in noisy.to_arrays("train").items():
        part = part.removeprefix("train.")
        assert float(values.std()) == pytest.approx(noise_std(1.5, part), rel=0.05), part
        assert float(values.mean()) == pytest.approx(0.0, abs=0.1 * noise_std(1.5, part))
    assert torch.equal(noisy.gram, noisy.gram.T)
    # sensitivity 1 per part: sum over parts of (1 / std)^2 is 1 / z^2, one Gaussian mechanism
    assert sum(noise_std(1.5, part) ** -2 for part in NOISE_SHARES) == pytest.approx(1.5 ** -2)


def test_one_row_moves_each_released_part_by_at_most_one():
    x, y = _rows(200, seed=6)
    base = HeadStatistics.of(x[1:], y[1:], LABELS)
    for scale in (1.0, 0.3):  # a row of unit length, and a shorter one
        added = (base + HeadStatistics.of(scale * x[:1], y[:1], LABELS)).to_arrays("s")
        for part, values in base.to_arrays("s").items():
            assert float((added[part] - values).norm()) <= 1.0 + 1e-12, part


def test_shrunk_noisy_means_are_closer_to_the_true_ones_and_exact_ones_stay():
    x, y = _rows(3000, seed=11, labels=40)
    exact = HeadStatistics.of(x, y, 40)
    truth = exact.class_sums / exact.class_counts[:, None]
    assert torch.equal(shrink_noisy_means(truth, exact.class_counts, 0.0), truth)
    generator = torch.Generator().manual_seed(13)
    raw_error = shrunk_error = 0.0
    # Ten sites' noise at z = 3: the noise in a mean about as large as the means' spread.
    total = 3 * 10 ** 0.5
    for _ in range(20):
        noisy = gaussian_noise(exact, total, generator)
        noise = noise_std(total, "class-sums")
        means = noisy.class_sums / noisy.class_counts[:, None]
        raw_error += float((means - truth).pow(2).sum())
        shrunk_error += float((shrink_noisy_means(means, noisy.class_counts, noise)
                               - truth).pow(2).sum())
    assert shrunk_error < 0.8 * raw_error, (shrunk_error, raw_error)
    fit = solve_head(noisy, shrinkages=(1.0,), class_sum_noise=noise)
    assert torch.isfinite(fit.weight).all()


def test_noise_that_makes_the_covariance_indefinite_is_shrunk_until_it_is_not():
    x, y = _rows(40, seed=8)
    noisy = gaussian_noise(HeadStatistics.of(x, y, LABELS), 0.5,
                           generator=torch.Generator().manual_seed(9))
    fit = solve_head(noisy, shrinkages=(0.0001, 0.5, 1.0))
    assert fit.shrinkage == 1.0 and torch.isfinite(fit.weight).all()
    with pytest.raises(ValueError, match="not positive definite"):
        solve_head(noisy, shrinkages=(0.0,))
