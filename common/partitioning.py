"""Split one data set into simulated sites, fixed by seed, with flwr-datasets' partitioners.

- iid: shuffled, equal shares.
- dirichlet: label skew; each label is spread over sites by Dirichlet(alpha) proportions.
- quantity: equal label mix, but site sizes drawn from Dirichlet(alpha).
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types

import numpy as np

from common.config import FedLoraConfig
from common.data import columns
from common.errors import FedLoraError

MIN_EXAMPLES_PER_SITE = 2  # one to train on, one to validate on


def partition_indices(dataset, cfg: FedLoraConfig) -> list[list[int]]:
    """Row indices of ``dataset`` for each of cfg.num_clients sites: disjoint, covering all."""
    partitioners = flwr_partitioners()
    DirichletPartitioner, IidPartitioner, SizePartitioner = (
        partitioners.DirichletPartitioner, partitioners.IidPartitioner,
        partitioners.SizePartitioner)
    n, k = len(dataset), cfg.num_clients
    if k * MIN_EXAMPLES_PER_SITE > n:
        raise FedLoraError(f"{k} clients need at least {k * MIN_EXAMPLES_PER_SITE} training "
                           f"examples, the data has {n}")
    indexed = dataset.add_column("_row", list(range(n)))
    if cfg.partition == "dirichlet":
        if not cfg.is_classification:
            raise FedLoraError("partition dirichlet skews labels: it needs task classification")
        partitioner = DirichletPartitioner(
            num_partitions=k, partition_by="target", alpha=cfg.alpha,
            min_partition_size=min(10, n // k), self_balancing=False, seed=cfg.seed)
    else:
        indexed = indexed.shuffle(seed=cfg.seed)
        if cfg.partition == "iid":
            partitioner = IidPartitioner(num_partitions=k)
        else:
            partitioner = SizePartitioner(partition_sizes=_dirichlet_sizes(n, k, cfg.alpha,
                                                                           cfg.seed))
    partitioner.dataset = indexed
    try:
        return [columns(partitioner.load_partition(i), "_row")[0] for i in range(k)]
    except ValueError as err:
        raise FedLoraError(f"cannot partition {n} examples over {k} clients with "
                           f"{cfg.partition} alpha={cfg.alpha}: {err}") from None


def deal_by_label(site_labels: list[list], rows_labels: list, seed: int) -> list[list[int]]:
    """Rows (by their labels) dealt out to sites in proportion to each site's share of each
    label in `site_labels` (the labels of each site's training rows): held-out rows from each
    site's own distribution. Each row goes to one site at most; a label no site trains on is
    dealt to none. Per label the shares are apportioned by largest remainder, the rows drawn
    in an order fixed by `seed`."""
    counts: dict = {}
    for site, labels in enumerate(site_labels):
        for label in labels:
            counts.setdefault(label, np.zeros(len(site_labels)))[site] += 1
    by_label: dict = {}
    for row, label in enumerate(rows_labels):
        by_label.setdefault(label, []).append(row)
    rng = np.random.default_rng(seed)
    dealt: list[list[int]] = [[] for _ in site_labels]
    for label in sorted(by_label, key=str):
        if label not in counts:
            continue
        rows = [by_label[label][i] for i in rng.permutation(len(by_label[label]))]
        exact = counts[label] / counts[label].sum() * len(rows)
        shares = np.floor(exact).astype(int)
        for site in np.argsort(-(exact - shares), kind="stable")[:len(rows) - shares.sum()]:
            shares[site] += 1
        start = 0
        for site, share in enumerate(shares):
            dealt[site] += rows[start:start + share]
            start += share
    return [sorted(rows) for rows in dealt]


def deal_test_split(pool, partitions: list[list[int]], test, seed: int) -> list[list[int]]:
    """site-eval-rows=test: each site's share of the `test` rows (their indices), dealt by
    `deal_by_label` by the labels of its partition of `pool` ("target" columns). The sites and
    the local-only baseline (simulations/baselines.py) deal with this one function, so both
    score the same rows."""
    (pool_labels,) = columns(pool, "target")
    return deal_by_label([[pool_labels[i] for i in partition] for partition in partitions],
                         columns(test, "target")[0], seed)


def _dirichlet_sizes(n: int, k: int, alpha: float, seed: int) -> list[int]:
    """Site sizes summing to n, each at least MIN_EXAMPLES_PER_SITE, proportional to a draw."""
    shares = np.random.default_rng(seed).dirichlet(np.full(k, alpha))
    spare = n - k * MIN_EXAMPLES_PER_SITE
    sizes = np.floor(shares * spare).astype(int) + MIN_EXAMPLES_PER_SITE
    sizes[np.argmax(shares)] += n - int(sizes.sum())
    return [int(s) for s in sizes]


def flwr_partitioners() -> types.ModuleType:
    """flwr_datasets.partitioner without running flwr_datasets/__init__.py, which imports its
    plotting helpers (seaborn, scipy): 2.4 s of CPU in the CLI and in every client process,
    on the way to the first training step. A later `import flwr_datasets` still gets the whole
    package: the bare parent is only there while the subpackage loads."""
    if "flwr_datasets.partitioner" in sys.modules:
        return sys.modules["flwr_datasets.partitioner"]
    spec = importlib.util.find_spec("flwr_datasets")
    if spec is None or not spec.submodule_search_locations:
        raise FedLoraError("flwr-datasets is not installed (pip install -e .)")
    bare = types.ModuleType("flwr_datasets")
    bare.__path__ = list(spec.submodule_search_locations)
    sys.modules["flwr_datasets"] = bare
    try:
        return importlib.import_module("flwr_datasets.partitioner")
    finally:
        if sys.modules.get("flwr_datasets") is bare:
            del sys.modules["flwr_datasets"]
