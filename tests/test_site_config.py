"""A deployed site: its node-config, its data read whole, the coordinator's evaluation set, and
the device it trains on."""

from __future__ import annotations

import sys
from unittest import mock

import pandas as pd
import pytest
import torch

from common.config import FedLoraConfig, SiteConfig
from common.data import load_server_splits, load_site_rows, resolve_labels
from common.errors import FedLoraError
from common.model import build_lora_model, compute_dtype, pick_device, quantization_config


def test_node_config_overrides_the_run_config_on_that_site_only():
    site = SiteConfig.from_node_config({"data-path": "/data/a.csv", "lora-r": 4,
                                        "batch-size": 8, "device": "cpu"})
    cfg = site.apply(FedLoraConfig(batch_size=32))
    assert (site.lora_r, cfg.batch_size, cfg.device) == (4, 8, "cpu")
    assert SiteConfig.from_node_config({"data-path": "/d"}).apply(FedLoraConfig()).batch_size \
        == 32
    # A simulated node has no data-path: not a deployed site.
    assert SiteConfig.from_node_config({"partition-id": 0, "num-partitions": 2}) is None


@pytest.mark.parametrize("node, message", [
    ({"data-path": "/d", "data_path": "/d"}, "unknown node-config key 'data_path'"),
    ({"data-path": "/d", "lora-r": "four"}, "node-config lora-r must be an integer"),
    ({"data-path": "/d", "device": "tpu"}, "device must be one of"),
    ({"data-path": " "}, "data-path is empty"),
])
def test_bad_node_config_is_named(node, message):
    with pytest.raises(FedLoraError, match=message):
        SiteConfig.from_node_config(node)


def test_a_site_trains_on_all_of_its_rows(tmp_path):
    frame = pd.DataFrame({"text": [f"query {i}" for i in range(20)], "category": ["a", "b"] * 10})
    frame.to_csv(tmp_path / "site.csv", index=False)
    cfg = FedLoraConfig(label_column="category")
    assert len(load_site_rows(cfg, str(tmp_path / "site.csv"))) == 20  # nothing held back
    (tmp_path / "folder").mkdir()
    frame.head(5).to_csv(tmp_path / "folder" / "train.csv", index=False)
    assert len(load_site_rows(cfg, str(tmp_path / "folder"))) == 5
    with pytest.raises(FedLoraError, match="node-config data-path '/nowhere.csv' does not exist"):
        load_site_rows(cfg, "/nowhere.csv")


def test_the_coordinator_evaluates_on_all_of_eval_data(tmp_path):
    frame = pd.DataFrame({"text": [f"q {i}" for i in range(30)], "category": ["x", "y", "z"] * 10})
    frame.to_csv(tmp_path / "eval.csv", index=False)
    cfg = FedLoraConfig(label_column="category", eval_data=str(tmp_path / "eval.csv"))
    splits = load_server_splits(cfg)
    assert len(splits.test) == 30
    trimmed = load_server_splits(cfg.replace(max_eval_examples=2))
    assert len(trimmed.test) == 2
    # The label set still comes from every row, not from the two evaluated.
    assert resolve_labels(cfg, trimmed) == ["x", "y", "z"]


def test_device_choice_and_precision():
    assert pick_device("cpu") == torch.device("cpu")
    with mock.patch("torch.cuda.is_available", return_value=True):
        assert pick_device("auto") == torch.device("cuda")
        with mock.patch("torch.cuda.is_bf16_supported", return_value=True):
            assert compute_dtype(torch.device("cuda")) == torch.bfloat16
        with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
            assert compute_dtype(torch.device("cuda")) == torch.float16
    with mock.patch("torch.cuda.is_available", return_value=False), \
            mock.patch("torch.backends.mps.is_available", return_value=True):
        assert pick_device("auto") == torch.device("mps")
    assert compute_dtype(torch.device("cpu")) == torch.float32
    if not torch.cuda.is_available():
        with pytest.raises(FedLoraError, match="no cuda device"):
            pick_device("cuda")


def test_4bit_without_cuda_or_bitsandbytes_is_a_clear_error():
    cfg = FedLoraConfig(load_in_4bit=True)
    with pytest.raises(FedLoraError, match="load-in-4bit needs a CUDA GPU; this site runs on cpu"):
        build_lora_model(cfg, ["a", "b"], device=torch.device("cpu"))
    with mock.patch.dict(sys.modules, {"bitsandbytes": None}), \
            pytest.raises(FedLoraError, match="needs the bitsandbytes package"):
        quantization_config(cfg, torch.device("cuda"))
    with pytest.raises(FedLoraError, match="4-bit weights cannot hold"):
        FedLoraConfig(load_in_4bit=True, strategy="exact")
