import json

import pandas as pd
import pytest

from common.config import FedLoraConfig
from common.data import columns, load_splits, resolve_labels, tokenize
from common.errors import FedLoraError
from common.model import build_lora_model
from common.partitioning import partition_indices


def _frame():
    return pd.DataFrame({"text": [f"query number {i}" for i in range(40)],
                         "intent": [["card", "loan", "fee", "atm"][i % 4] for i in range(40)]})


@pytest.mark.parametrize("suffix", [".csv", ".json", ".jsonl", ".parquet"])
def test_every_file_type_loads_and_holds_back_a_test_slice(tmp_path, suffix):
    path = tmp_path / f"data{suffix}"
    frame = _frame()
    {".csv": lambda: frame.to_csv(path, index=False),
     ".json": lambda: frame.to_json(path, orient="records"),
     ".jsonl": lambda: frame.to_json(path, orient="records", lines=True),
     ".parquet": lambda: frame.to_parquet(path)}[suffix]()
    cfg = FedLoraConfig(data=str(path), label_column="intent", test_fraction=0.25)
    splits = load_splits(cfg)
    assert len(splits.train) == 30 and len(splits.test) == 10
    assert sorted(set(splits.train["text"]) | set(splits.test["text"])) == sorted(frame["text"])


def test_columns_read_whole_columns_of_shuffled_and_selected_rows(tmp_path):
    path = tmp_path / "data.csv"
    _frame().to_csv(path, index=False)
    splits = load_splits(FedLoraConfig(data=str(path), label_column="intent", test_fraction=0.25))
    rows = splits.train.select([5, 0, 17])  # an index mapping over the shuffled split
    texts, targets = columns(rows, "text", "target")
    assert isinstance(texts, list) and texts == [row["text"] for row in rows]
    assert targets == [row["target"] for row in rows]
    assert columns(rows.select([]), "text") == ([],)


def test_a_folder_uses_its_train_and_test_files(banking77_dir):
    splits = load_splits(FedLoraConfig(data=str(banking77_dir), label_column="category"))
    assert (len(splits.train), len(splits.test)) == (10003, 3080)
    labels = resolve_labels(FedLoraConfig(label_column="category"), splits)
    assert len(labels) == 77
    assert labels == sorted(json.loads((banking77_dir / "categories.json").read_text()))


@pytest.mark.parametrize("cfg_kwargs, fragment", [
    ({"data": "/no/such/file.csv"}, "does not exist"),
    ({"data": "./missing_folder"}, "does not exist"),
    ({"label_column": "label"},
     "has no column 'label' (set label-column; columns found: text, intent)"),
    ({"text_column": "query"}, "has no column 'query' (set text-column"),
])
def test_bad_data_is_named(tmp_path, cfg_kwargs, fragment):
    path = tmp_path / "d.csv"
    _frame().to_csv(path, index=False)
    cfg = FedLoraConfig(**{"data": str(path), "label_column": "intent", **cfg_kwargs})
    with pytest.raises(FedLoraError) as err:
        load_splits(cfg)
    assert fragment in str(err.value)


def test_label_ids_agree_across_clients_with_disjoint_labels(tmp_path):
    """Two sites that share no label still map every label to the same id."""
    frame = _frame().sort_values("intent")  # card/atm rows first, fee/loan rows last
    path = tmp_path / "d.csv"
    frame.to_csv(path, index=False)
    cfg = FedLoraConfig(data=str(path), label_column="intent", test_fraction=0.1,
                        num_clients=2, partition="dirichlet", alpha=0.01, seed=0)
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits)
    lora = build_lora_model(cfg, labels)
    sites = [splits.train.select(rows) for rows in partition_indices(splits.train, cfg)]
    seen = [set(site["target"]) for site in sites]
    assert seen[0].isdisjoint(seen[1]), seen  # alpha 0.01 puts each label on one site
    for site in sites:
        for example, target in zip(tokenize(site, lora.tokenizer, cfg, labels), site["target"]):
            assert labels[example["labels"]] == target
    assert labels == ["atm", "card", "fee", "loan"]


def test_labels_from_config_and_unknown_labels(tmp_path):
    cfg = FedLoraConfig(labels="fee, card,atm,loan")
    assert resolve_labels(cfg) == ["fee", "card", "atm", "loan"]
    file = tmp_path / "labels.json"
    file.write_text(json.dumps(["x", "y"]))
    assert resolve_labels(FedLoraConfig(labels=str(file))) == ["x", "y"]
    path = tmp_path / "d.csv"
    _frame().to_csv(path, index=False)
    cfg = FedLoraConfig(data=str(path), label_column="intent", labels="card,loan")
    lora = build_lora_model(cfg, ["card", "loan"])
    with pytest.raises(FedLoraError, match="not in the shared label set"):
        tokenize(load_splits(cfg).train, lora.tokenizer, cfg, ["card", "loan"])


def test_an_unreachable_hub_data_set_is_named():
    with pytest.raises(FedLoraError, match="'no-such-org/no-such-data' is not a local file or "
                                           "folder and cannot be loaded from the Hugging Face hub"):
        load_splits(FedLoraConfig(data="no-such-org/no-such-data"))
