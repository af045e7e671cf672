"""Client-level DP with Flower's fixed-clipping wrappers: the accountant against the Gaussian
mechanism by hand, clipping on the site (Flower's mod) or on the server, the noise of the
released mean, the same under SecAgg+, the budget that ends a run, and the refusals."""

from __future__ import annotations

import json
import math

import pytest
import torch
from flwr.app import ConfigRecord

from common.config import FedLoraConfig
from common.data import load_server_splits, resolve_labels
from common.errors import FedLoraError
from common.model import build_lora_model
from common.records import adapter_to_record, record_to_adapter
from server.app import run_federation, training_exchange
from server.client_dp import ClientLevelDP
from server.strategies import build_strategy, check_privacy_fits_strategy
from server.strategies.fedavg import LoraFedAvg
from simulations.inprocess import InProcessGrid
from simulations.progress import format_round
from tests.conftest import recording_grid
from tests.test_secure_aggregation import SITES, _cfg

DP_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]


def _by_hand(releases: int, sigma: float, delta: float) -> float:
    """k Gaussian releases at noise multiplier sigma: RDP k*a/(2 sigma^2) at order a, turned
    into (eps, delta) with Proposition 12 of Canonne-Kamath-Steinke (dp-accounting's rule)."""
    return min(releases * a / (2 * sigma**2) + math.log1p(-1 / a) - math.log(delta * a) / (a - 1)
               for a in DP_ORDERS)


def test_epsilon_per_release_matches_the_gaussian_mechanism_and_survives_a_checkpoint():
    cfg = FedLoraConfig(client_dp_noise_multiplier=1.3, client_dp_delta=1e-4)
    strategy = LoraFedAvg(cfg, {"w": torch.zeros(2)})
    dp = ClientLevelDP(strategy, cfg)
    for server_round in (1, 2, 3):
        assert dp.allow_release(sampled=5)
        dp.record_release(server_round)
        assert dp.epsilon() == pytest.approx(_by_hand(server_round, 1.3, 1e-4), rel=1e-9)
        assert strategy.round_stats[server_round].client_dp["releases"] == server_round
    assert strategy.round_stats[3].client_dp["noise-std"] == pytest.approx(1.3 * 0.1 / 5)
    resumed = ClientLevelDP(LoraFedAvg(cfg, {"w": torch.zeros(2)}), cfg)
    resumed.load_state_tensors(dp.state_tensors())
    assert resumed.epsilon() == dp.epsilon()


def _update_norm(state, initial) -> float:
    return math.sqrt(sum(float((state[n].double() - initial[n].double()).pow(2).sum())
                         for n in state))


def _round(cfg: FedLoraConfig):
    """Round 1 from the initial adapter: the released adapter, the round's statistics, the
    adapters the sites sent (empty under SecAgg+), and the initial adapter."""
    labels = resolve_labels(cfg, load_server_splits(cfg))
    lora = build_lora_model(cfg, labels)
    initial = lora.trainable_state()
    strategy = build_strategy(cfg, lora)
    exchange, _ = training_exchange(strategy, cfg)
    grid = recording_grid(cfg, SITES)
    arrays, _ = exchange(grid, 1, adapter_to_record(initial),
                         ConfigRecord({"labels": json.dumps(labels)}), 60.0)
    sent = [record_to_adapter(r.content["arrays"]) for r in grid.replies
            if not r.has_error() and "arrays" in r.content.array_records]
    return arrays, strategy.round_stats[1], sent, initial


@pytest.fixture(scope="module")
def unclipped(banking_subset, tiny_llama_dir):
    """The sites' plain updates of round 1, and a clip norm below every one of them."""
    from common.flower_compat import set_task_identity

    set_task_identity(run_id=1, task_id=1, node_id=0)
    _, _, sent, initial = _round(_cfg(banking_subset, tiny_llama_dir))
    norms = [_update_norm(s, initial) for s in sent]
    return norms, min(norms) / 2


@pytest.mark.parametrize("clipping,secure", [("client", False), ("server", False),
                                             ("client", True)],
                         ids=["clipped-on-site", "clipped-on-server", "on-site-under-secagg"])
def test_released_mean_is_the_clipped_mean_plus_calibrated_noise(
        clipping, secure, unclipped, banking_subset, tiny_llama_dir, task_identity):
    norms, clip = unclipped
    sigma = 0.8
    cfg = _cfg(banking_subset, tiny_llama_dir, client_dp_noise_multiplier=sigma,
               client_dp_clip_norm=clip, client_dp_clipping=clipping, secure_aggregation=secure)
    released, stats, sent, initial = _round(cfg)
    if secure:  # the server saw no update: the sites' clipped ones come from a run without it
        assert not sent
        sent = _round(cfg.replace(secure_aggregation=False))[2]
    sent_norms = [_update_norm(s, initial) for s in sent]
    if clipping == "client":  # Flower's fixedclipping_mod clipped before anything left the site
        assert max(sent_norms) <= clip * (1 + 1e-5)
    else:
        assert sent_norms == pytest.approx(norms, rel=1e-6)
    clipped = []
    for state in sent:
        scale = min(1.0, clip / _update_norm(state, initial))
        clipped.append({n: initial[n].double() + scale * (t.double() - initial[n].double())
                        for n, t in state.items()})
    mean = {n: sum(c[n] for c in clipped) / len(clipped) for n in clipped[0]}
    noise = torch.cat([(record_to_adapter(released)[n].double() - mean[n]).flatten()
                       for n in mean])
    expected = sigma * clip / SITES  # equal weights: the noise of Flower's wrapper
    assert noise.std().item() == pytest.approx(expected, rel=0.05)
    assert abs(noise.mean().item()) < 0.1 * expected
    assert stats.client_dp["epsilon"] == pytest.approx(_by_hand(1, sigma, 1e-5), rel=1e-9)
    assert stats.client_dp["noise-std"] == pytest.approx(expected)


def test_a_missing_site_means_no_release(banking_subset, tiny_llama_dir, task_identity,
                                         monkeypatch):
    """The noise is calibrated to every sampled site's update: with one missing, nothing is
    released (plain FedAvg would have aggregated the other two)."""
    monkeypatch.setenv("FEDLORA_INJECT_FAULTS", "1:raise@1")
    released, stats, _, _ = _round(_cfg(banking_subset, tiny_llama_dir,
                                        client_dp_noise_multiplier=1.0))
    assert released is None and stats.clients["train-clients-aggregated"] == 0
    assert stats.client_dp is None
    assert [d["node"] for d in stats.dropped] == [1001]


def test_target_epsilon_ends_the_run_before_it_is_exceeded(banking_subset, tiny_llama_dir,
                                                          tmp_path, task_identity):
    sigma = 2.0
    target = (_by_hand(2, sigma, 1e-5) + _by_hand(3, sigma, 1e-5)) / 2
    cfg = _cfg(banking_subset, tiny_llama_dir, num_rounds=5, client_dp_noise_multiplier=sigma,
               client_dp_target_epsilon=target, out_dir=str(tmp_path / "run"))
    run = run_federation(InProcessGrid(cfg, SITES), cfg)
    rounds = run.read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[-1]["client-dp"]["epsilon"] <= target
    assert f"client-level epsilon {rounds[-1]['client-dp']['epsilon']:.2f}" in \
        format_round(rounds[-1], cfg)
    summary = json.loads((run.path / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 2
    assert "client-dp-target-epsilon" in summary["stopped-early"]
    assert summary["stop-reason"] == "client-dp-budget"


@pytest.mark.parametrize("strategy", ["fedadam", "fedyogi", "fedavgm", "exact", "hetlora",
                                      "median", "trimmed-mean"])
def test_strategies_not_releasing_a_plain_mean_refuse_client_level_dp(strategy):
    with pytest.raises(FedLoraError, match="client-level DP adds noise calibrated"):
        check_privacy_fits_strategy(FedLoraConfig(strategy=strategy,
                                                  client_dp_noise_multiplier=1.0))


@pytest.mark.parametrize("settings,message", [
    ({"client_dp_noise_multiplier": 1.0, "dp_noise_multiplier": 1.0}, "choose one kind"),
    ({"client_dp_noise_multiplier": 1.0, "client_dp_clipping": "server",
      "secure_aggregation": True}, "set client-dp-clipping=client"),
    ({"client_dp_target_epsilon": 3.0}, "needs client-level DP"),
    ({"client_dp_clipping": "site"}, "client-dp-clipping must be one of"),
    ({"client_dp_noise_multiplier": 1.0, "client_dp_clip_norm": 0.0}, "clip-norm must be"),
    ({"secure_aggregation": True, "max_update_norm": 5.0}, "set max-update-norm=0"),
    ({"secagg_threshold": 0.0}, "secagg-threshold must be in"),
    ({"secure_aggregation": True, "min_train_clients": 1}, "set min-train-clients >= 2"),
])
def test_bad_privacy_settings_are_named(settings, message):
    with pytest.raises(FedLoraError, match=message):
        FedLoraConfig(**settings)


def test_a_malformed_update_is_left_out_by_name_under_server_clipping(task_identity):
    """Flower's server-side clipping would subtract arrays of other shapes and crash; the
    strategy's own check names the site, and nothing is released that round."""
    from tests.conftest import StaticGrid
    from tests.test_strategy import _reply, _state

    cfg = FedLoraConfig(client_dp_noise_multiplier=1.0, client_dp_clipping="server",
                        min_available_clients=3, min_train_clients=2)
    strategy = LoraFedAvg(cfg, _state(0))
    dp = ClientLevelDP(strategy, cfg)
    messages = dp.configure_train(1, adapter_to_record(_state(0)), ConfigRecord(),
                                  StaticGrid([1, 2, 3]))
    replies = [_reply(messages[0], _state(1), 10), _reply(messages[1], _state(2), 10),
               _reply(messages[2], _state(3, shape_b=(4, 3)), 10)]
    arrays, _ = dp.aggregate_train(1, replies)
    stats = strategy.round_stats[1]
    assert arrays is None and stats.client_dp is None and dp.epsilon() == 0.0
    assert [d["node"] for d in stats.dropped] == [3]
    assert "has shape (4, 3)" in stats.dropped[0]["reason"]
