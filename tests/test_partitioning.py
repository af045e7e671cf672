import datasets
import numpy as np
import pytest

from common.config import FedLoraConfig
from common.data import train_val_split
from common.errors import FedLoraError
from common.partitioning import partition_indices


def _labelled(n=600, num_labels=6, seed=0):
    rng = np.random.default_rng(seed)
    labels = [f"l{x}" for x in rng.integers(num_labels, size=n)]
    return datasets.Dataset.from_dict({"text": [f"q{i}" for i in range(n)], "target": labels})


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_partitions_are_deterministic_and_cover_every_row_once(scheme):
    data = _labelled()
    cfg = FedLoraConfig(num_clients=7, partition=scheme, alpha=0.3, seed=5)
    first, again = partition_indices(data, cfg), partition_indices(data, cfg)
    assert first == again
    rows = sorted(i for part in first for i in part)
    assert rows == list(range(len(data)))
    assert len(first) == 7 and all(len(p) >= 2 for p in first)
    assert partition_indices(data, cfg.replace(seed=6)) != first


def test_skewed_partitions_are_skewed():
    data = _labelled()
    labels = np.array(data["target"])

    def label_spread(scheme):  # mean over sites of the share of its most common label
        parts = partition_indices(data, FedLoraConfig(num_clients=5, partition=scheme,
                                                      alpha=0.1, seed=1))
        return np.mean([max(np.unique(labels[p], return_counts=True)[1]) / len(p)
                        for p in parts]), [len(p) for p in parts]

    iid_top, iid_sizes = label_spread("iid")
    dir_top, _ = label_spread("dirichlet")
    _, quantity_sizes = label_spread("quantity")
    assert dir_top > iid_top + 0.3
    assert max(iid_sizes) - min(iid_sizes) <= 1
    assert max(quantity_sizes) > 3 * min(quantity_sizes)


def test_more_clients_than_examples_is_refused():
    with pytest.raises(FedLoraError, match="12 clients need at least 24 training examples"):
        partition_indices(_labelled(n=20), FedLoraConfig(num_clients=12))


def test_site_train_val_split_is_disjoint_and_seeded():
    rows = list(range(100, 150))
    train, val = train_val_split(rows, 0.2, seed=3)
    assert sorted(train + val) == rows and len(val) == 10
    assert train_val_split(rows, 0.2, seed=3) == (train, val)
    assert train_val_split([4, 9], 0.1, seed=0)[1] != []  # at least one validation example


def test_test_rows_are_dealt_by_each_sites_share_of_each_label_and_seeded():
    from common.partitioning import deal_by_label

    site_labels = [["a"] * 6 + ["b"] * 2, ["b"] * 6 + ["c"] * 1, ["a"] * 2]
    rows = ["a"] * 8 + ["b"] * 16 + ["c"] * 3 + ["d"] * 5
    dealt = deal_by_label(site_labels, rows, seed=3)
    counts = [{label: sum(rows[i] == label for i in d) for label in "abcd"} for d in dealt]
    # a: 6:0:2 of 8 rows; b: 2:6:0 of 16; c: only site 1 trains on it; d: nobody does
    assert counts == [{"a": 6, "b": 4, "c": 0, "d": 0}, {"a": 0, "b": 12, "c": 3, "d": 0},
                      {"a": 2, "b": 0, "c": 0, "d": 0}]
    flat = [i for d in dealt for i in d]
    assert len(flat) == len(set(flat)) == 27  # each row once at most, every label-d row out
    assert deal_by_label(site_labels, rows, seed=3) == dealt
    assert deal_by_label(site_labels, rows, seed=4) != dealt
    # Largest remainder: 3 rows of a label shared 1:1 between two sites go 2 and 1, not 1 and 1
    assert sorted(len(d) for d in deal_by_label([["x"], ["x"]], ["x"] * 3, 0)) == [1, 2]
