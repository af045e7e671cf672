"""Secure aggregation with Flower's SecAgg+: the unmasked sum against the plain aggregate of the
same replies (with and without a site dropping out mid-protocol), what the server receives, a
federation's accuracy against the same run without it, and the refusals."""

from __future__ import annotations

import json

import pytest
from flwr.app import ConfigRecord

from common.config import FedLoraConfig
from common.data import load_server_splits, resolve_labels
from common.errors import FedLoraError
from common.model import build_lora_model
from common.records import adapter_to_record, record_to_adapter
from server.app import run_federation, training_exchange
from server.secure_aggregation import quantization_range
from server.strategies import build_strategy, check_privacy_fits_strategy
from simulations.inprocess import InProcessGrid
from tests.conftest import recording_grid

SITES = 3


def _cfg(banking_subset, tiny_llama_dir, **changes) -> FedLoraConfig:
    base = FedLoraConfig(data=str(banking_subset), model=str(tiny_llama_dir),
                         label_column="category", lora_r=4, local_steps=4, num_clients=SITES,
                         min_train_clients=2, min_evaluate_clients=2, min_available_clients=SITES,
                         max_eval_examples=60, round_retries=0)
    return base.replace(**changes)


def _one_round(cfg: FedLoraConfig):
    """Round 1 of a federation from the initial adapter: the new global adapter and the
    strategy's statistics of the round."""
    labels = resolve_labels(cfg, load_server_splits(cfg))
    lora = build_lora_model(cfg, labels)
    strategy = build_strategy(cfg, lora)
    exchange, _ = training_exchange(strategy, cfg)
    grid = recording_grid(cfg, SITES)  # the replies as sent: the server may clip
    initial = lora.trainable_state()
    arrays, _ = exchange(grid, 1, adapter_to_record(initial),
                         ConfigRecord({"labels": json.dumps(labels)}), 60.0)
    return arrays, strategy.round_stats[1], grid, initial


@pytest.mark.parametrize("fault,dtype", [("", "float32"), ("1:raise@1", "float32"),
                                         ("", "int8")],
                         ids=["all-sites", "site-1-drops-out", "int8-transfer"])
def test_secagg_sum_equals_the_plain_aggregate_within_quantisation(
        fault, dtype, banking_subset, tiny_llama_dir, task_identity, monkeypatch):
    """With int8 transfer the sites sum their adapters' values, not the int8 codes."""
    monkeypatch.setenv("FEDLORA_INJECT_FAULTS", fault)
    cfg = _cfg(banking_subset, tiny_llama_dir, transfer_dtype=dtype)
    plain_arrays, plain_stats, _, initial = _one_round(cfg)
    secure_arrays, stats, grid, _ = _one_round(cfg.replace(secure_aggregation=True))

    counts = [c["num-examples"] for c in stats.train_per_client]
    assert len(counts) == (2 if fault else 3)
    assert counts == [c["num-examples"] for c in plain_stats.train_per_client]
    if fault:  # the masks of the site that dropped out were reconstructed from its shares
        assert [d["node"] for d in stats.dropped] == [1001]
        assert "injected fault" in stats.dropped[0]["reason"]
    # Each site's weighted value is rounded once to the fixed-point grid 2c/R; the sum's error
    # is at most one step per site, divided by the sum of the weights n_k / max-weight.
    step = 2 * cfg.secagg_clipping_range / quantization_range(SITES)
    bound = len(counts) * step / (sum(counts) / cfg.secagg_max_weight)
    plain, secure = record_to_adapter(plain_arrays), record_to_adapter(secure_arrays)
    gaps = [float((secure[n].double() - plain[n].double()).abs().max()) for n in plain]
    moved = [float((plain[n] - t).abs().max()) for n, t in initial.items()]
    assert 0 < max(gaps) <= bound + 1e-7  # rounded, as the protocol must, and no further
    assert max(moved) > 1000 * bound  # the round moved the adapter far more than that

    # The server never held one site's adapter: every SecAgg+ reply's arrays are empty.
    held = [record for reply in grid.replies if not reply.has_error()
            for record in reply.content.array_records.values()]
    assert grid.replies and all(len(record) == 0 for record in held)
    assert stats.bytes_up > 0


def test_secagg_federation_is_within_one_point_of_the_plain_one(banking_subset, tiny_llama_dir,
                                                                 tmp_path, task_identity):
    finals, uploads = {}, {}
    for secure in (False, True):
        # float32 training: on 60 test rows one point is one row, and bf16's rounding makes the
        # two federations' trajectories part by more than SecAgg+'s fixed-point step does.
        cfg = _cfg(banking_subset, tiny_llama_dir, num_rounds=3, local_steps=6,
                   learning_rate=0.01, secure_aggregation=secure, cpu_bf16=False,
                   out_dir=str(tmp_path / f"secure-{secure}"))
        run = run_federation(InProcessGrid(cfg, SITES), cfg)
        rounds = run.read_rounds()
        assert [r["clients"]["train-clients-aggregated"] for r in rounds[1:]] == [SITES] * 3
        assert rounds[-1]["server"]["accuracy"] >= rounds[0]["server"]["accuracy"] + 0.1
        finals[secure] = rounds[-1]["server"]["accuracy"]
        uploads[secure] = rounds[-1]["bytes-up"]
    assert abs(finals[True] - finals[False]) <= 0.01
    assert uploads[True] > 1.5 * uploads[False]  # masked 64-bit integers, not float32 adapters


def test_a_site_above_secagg_max_weight_refuses_by_name(banking_subset, tiny_llama_dir,
                                                       task_identity):
    cfg = _cfg(banking_subset, tiny_llama_dir, secure_aggregation=True, secagg_max_weight=50)
    arrays, stats, _, _ = _one_round(cfg)
    assert arrays is None and stats.clients["train-clients-aggregated"] == 0
    assert len(stats.dropped) == SITES
    assert all("more than secagg-max-weight (50)" in d["reason"] for d in stats.dropped)


@pytest.mark.parametrize("strategy", ["exact", "median", "trimmed-mean", "hetlora"])
def test_strategies_that_need_each_update_refuse_secure_aggregation(strategy):
    cfg = FedLoraConfig(strategy=strategy, secure_aggregation=True)
    with pytest.raises(FedLoraError, match=f"strategy {strategy} needs each site's own update"):
        check_privacy_fits_strategy(cfg)


@pytest.mark.parametrize("strategy", ["fedavg", "fedprox", "ffa", "fedadam", "fedyogi",
                                      "fedavgm"])
def test_sum_only_strategies_accept_secure_aggregation(strategy):
    check_privacy_fits_strategy(FedLoraConfig(strategy=strategy, secure_aggregation=True))


def test_quantisation_range_never_wraps_the_modulus():
    for sites in (2, 3, 10, 16, 100, 1000):
        step = quantization_range(sites)
        assert sites * step <= 2**32 and step <= 2**30
        assert (sites + 1) * step * 2 > 2**32 or step == 2**30  # and is not needlessly coarse


def test_an_unusable_secure_sum_is_refused_by_the_replies_contract():
    import numpy as np
    import torch
    from flwr.common import ndarrays_to_parameters

    from server.secure_aggregation import decode_secure_mean

    reference = {"m.lora_A.weight": torch.zeros(2, 3), "m.lora_B.weight": torch.zeros(3, 2)}
    names = list(reference)
    good = [np.ones((2, 3)), np.full((3, 2), 2.0)]
    mean = decode_secure_mean(ndarrays_to_parameters(good), names, reference)
    assert list(mean) == names and float(mean["m.lora_B.weight"].sum()) == 12.0
    with pytest.raises(FedLoraError, match="non-finite"):
        decode_secure_mean(ndarrays_to_parameters([good[0], np.full((3, 2), np.nan)]),
                           names, reference)
    with pytest.raises(FedLoraError, match="the secure sum: tensor 'm.lora_B.weight' has shape"):
        decode_secure_mean(ndarrays_to_parameters([good[0], np.ones((2, 2))]), names,
                           reference)
