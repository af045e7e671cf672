"""Split one data set into simulated sites, fixed by seed, with flwr-datasets' partitioners.

- iid: shuffled, equal shares.
- dirichlet: label skew; each label is spread over sites by Dirichlet(alpha) proportions.
- quantity: equal label mix, but site sizes drawn from Dirichlet(alpha).
"""

from __future__ import annotations

import numpy as np

from common.config import FedLoraConfig
from common.errors import FedLoraError

MIN_EXAMPLES_PER_SITE = 2  # one to train on, one to validate on


def partition_indices(dataset, cfg: FedLoraConfig) -> list[list[int]]:
    """Row indices of ``dataset`` for each of cfg.num_clients sites: disjoint, covering all."""
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, SizePartitioner

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
        return [list(partitioner.load_partition(i)["_row"]) for i in range(k)]
    except ValueError as err:
        raise FedLoraError(f"cannot partition {n} examples over {k} clients with "
                           f"{cfg.partition} alpha={cfg.alpha}: {err}") from None


def _dirichlet_sizes(n: int, k: int, alpha: float, seed: int) -> list[int]:
    """Site sizes summing to n, each at least MIN_EXAMPLES_PER_SITE, proportional to a draw."""
    shares = np.random.default_rng(seed).dirichlet(np.full(k, alpha))
    spare = n - k * MIN_EXAMPLES_PER_SITE
    sizes = np.floor(shares * spare).astype(int) + MIN_EXAMPLES_PER_SITE
    sizes[np.argmax(shares)] += n - int(sizes.sum())
    return [int(s) for s in sizes]
