"""The head round in a federation (server/head_round.py, the sites' handler in client/app.py):
the head installed is the one solved from what the sites sent, it stays as solved while LoRA
trains, a refit solves it again on the new features, SecAgg+ gives the same head, DP noise
is as large as its accounting says, and what each setting refuses."""

from __future__ import annotations

import json

import pytest
import torch

from client.privacy import PrivacyBudgetExhausted, epsilon_after, release_head_statistics
from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.head import HeadStatistics, noise_std, solve_head
from common.message_types import HEAD_STATISTICS
from common.records import HEAD_RELEASES, record_to_adapter
from server.app import run_federation
from server.contract import HEAD_SPLITS, parse_head_reply
from server.strategies import resolve_head_mode
from tests.conftest import recording_grid

pytestmark = pytest.mark.usefixtures("task_identity")
SITES, LABELS = 3, 10


def _cfg(banking_subset, tmp_path, **changes) -> FedLoraConfig:
    base = FedLoraConfig(data=str(banking_subset), label_column="category", lora_r=4,
                         local_steps=3, num_clients=SITES, partition="dirichlet", alpha=0.3,
                         min_available_clients=SITES, max_eval_examples=150, round_retries=0,
                         out_dir=str(tmp_path / "run"))
    return base.replace(**changes)


def _run(cfg: FedLoraConfig):
    grid = recording_grid(cfg, SITES)
    run = run_federation(grid, cfg)
    final = record_to_adapter_file(run.path / "final_adapter")
    return run.read_rounds(), grid, final


def record_to_adapter_file(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _head(state: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The classifier's weight and bias, as a record or a saved adapter names them."""
    def find(suffix):
        return next(t for n, t in state.items() if n.startswith("base_model.model.classifier.")
                    and n.endswith(suffix))
    return find(".weight"), find(".bias")


def _head_replies(grid, dim: int, noisy: bool = False):
    """Each head round's replies, parsed as the server does, in the order sent."""
    rounds: dict[int, list] = {}
    for request, reply in grid.pairs:
        if request.metadata.message_type == HEAD_STATISTICS:
            releases = int(request.content["config"][HEAD_RELEASES])
            rounds.setdefault(releases, []).append(
                parse_head_reply(reply, dim, LABELS, noisy=noisy, unit_features=not noisy))
    return rounds


def _solve(replies) -> tuple[torch.Tensor, torch.Tensor]:
    sums = [HeadStatistics.zeros(384, LABELS) for _ in HEAD_SPLITS]
    for reply in sorted(replies, key=lambda r: r.num_examples):
        sums = [sums[0] + reply.train, sums[1] + reply.val]
    fit = solve_head(*sums)
    return fit.weight.float(), fit.bias.float()


def test_the_global_head_is_solved_from_the_sites_sums_and_frozen_while_lora_trains(
        banking_subset, tmp_path):
    cfg = _cfg(banking_subset, tmp_path, num_rounds=2, head_refit_every=2)
    rounds, grid, final = _run(cfg)

    head = rounds[0]["head"]
    assert head["sites"] == SITES and head["labels-present"] == LABELS
    assert head["bytes-up-per-site"] > 8 * (384 * 385 // 2 + 384 * LABELS)  # float64 sums
    assert rounds[0]["server"]["accuracy"] >= 0.8  # the head alone, before any LoRA training
    assert "head" not in rounds[1] and rounds[2]["head"]["sites"] == SITES  # refit at round 2
    replies = _head_replies(grid, 384)
    assert sorted(replies) == [1, 2]  # releases numbered as sent
    assert head["rows"] == sum(r.num_examples for r in replies[1])

    # Round 1 sent the solved head; the sites trained LoRA under it and sent back their LoRA
    # factors only (the head is the server's already), and the head came out as it went in.
    sent = [record_to_adapter(request.content["arrays"]) for request, _ in grid.pairs
            if request.metadata.message_type == "train"]
    sent_head = _head(sent[0])
    assert torch.equal(sent_head[0], _solve(replies[1])[0])
    trained = [record_to_adapter(reply.content["arrays"]) for request, reply in grid.pairs
               if request.metadata.message_type == "train"]
    assert trained and all(".lora_" in n for state in trained for n in state)
    assert all(n in trained[0] for n in sent[0] if ".lora_" in n)
    lora_moved = [n for n, t in trained[0].items() if ".lora_B." in n and t.abs().max() > 0]
    assert lora_moved  # B starts at zero: LoRA did train
    evaluated = [record_to_adapter(request.content["arrays"]) for request, _ in grid.pairs
                 if request.metadata.message_type == "evaluate"]
    assert torch.equal(_head(evaluated[0])[0], sent_head[0])  # round 1's global head

    # The final head is the refit on round 2's features, not round 0's head.
    weight, bias = _head(final)
    refit = _solve(replies[2])
    assert torch.equal(weight, refit[0]) and torch.equal(bias, refit[1])
    assert not torch.equal(weight, sent_head[0])


@pytest.fixture(scope="module")
def head_alone(banking_subset, tmp_path_factory):
    """A run of the head round alone (num-rounds=0), in the clear: rounds, grid, adapter."""
    # A max-weight near the largest site's rows (~100) spends SecAgg+'s fixed-point bits on
    # the sums rather than on headroom (docs/privacy.md); the plain run ignores it.
    return _run(_cfg(banking_subset, tmp_path_factory.mktemp("plain"), num_rounds=0,
                     secagg_max_weight=200))


def test_a_large_federation_is_asked_batch_by_batch_for_the_same_head(
        head_alone, banking_subset, tmp_path, monkeypatch):
    """The server holds one batch of statistics at a time (server/head_round.py HEAD_BATCH);
    the head solved from the batches' sums is the head of all replies summed at once."""
    import server.head_round

    monkeypatch.setattr(server.head_round, "HEAD_BATCH", 2)
    grid = recording_grid(_cfg(banking_subset, tmp_path), SITES)
    batches = []
    send = grid.send_and_receive

    def counted(messages, timeout=None):
        messages = list(messages)
        batches.append(len(messages))
        return send(messages, timeout)

    monkeypatch.setattr(grid, "send_and_receive", counted)
    run = run_federation(grid, _cfg(banking_subset, tmp_path, num_rounds=0,
                                    secagg_max_weight=200))
    assert batches == [2, 1]
    batched, whole = run.read_rounds()[0]["head"], head_alone[0][0]["head"]
    assert batched["sites"] == whole["sites"] == SITES and batched["rows"] == whole["rows"]
    assert batched["bytes-up"] == whole["bytes-up"]
    ours = _head(record_to_adapter_file(run.path / "final_adapter"))
    theirs = _head(head_alone[2])
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(ours, theirs))


def test_the_head_through_secure_aggregation_is_the_plain_one(banking_subset, tmp_path,
                                                               head_alone):
    plain_rounds, _, plain_final = head_alone
    cfg = _cfg(banking_subset, tmp_path, num_rounds=0, secure_aggregation=True,
               secagg_max_weight=200)
    rounds, grid, final = _run(cfg)
    assert rounds[0]["head"]["secure"] is True and rounds[0]["head"]["sites"] == SITES
    assert plain_rounds[0]["head"]["secure"] is False
    # The server never held one site's statistics.
    held = [record for reply in grid.replies if not reply.has_error()
            for record in reply.content.array_records.values()]
    assert held and all(len(record) == 0 for record in held)
    plain, secure = _head(plain_final), _head(final)
    gap = max(float((secure[i] - plain[i]).abs().max()) for i in (0, 1))
    assert 0 < gap <= 1e-3 * float(plain[0].abs().max())  # quantised, no further
    assert rounds[0]["server"]["accuracy"] == plain_rounds[0]["server"]["accuracy"]


def test_dp_noise_on_the_statistics_is_as_large_as_accounted(banking_subset, tmp_path,
                                                              head_alone):
    exact = _head_replies(head_alone[1], 384)
    cfg = _cfg(banking_subset, tmp_path / "dp", num_rounds=0, head_dp_noise_multiplier=0.5)
    rounds, grid, _ = _run(cfg)
    noisy = _head_replies(grid, 384, noisy=True)

    by_node = {r.node_id: r for r in exact[1]}  # both runs: the same nodes and partitions
    noise: dict[str, list] = {}
    for reply in noisy[1]:
        clean = by_node[reply.node_id]
        for split, (a, b) in zip(HEAD_SPLITS, ((reply.train, clean.train),
                                               (reply.val, clean.val))):
            for name, values in a.to_arrays(split).items():
                part = name.partition(".")[2]
                noise.setdefault(part, []).append((values - b.to_arrays(split)[name]).flatten())
    for part, values in noise.items():
        values = torch.cat(values)  # a std estimated from n values is good to ~1 / sqrt(2n)
        tolerance = 4 / (2 * values.numel()) ** 0.5
        assert float(values.std()) == pytest.approx(noise_std(0.5, part), rel=tolerance), part
    assert torch.cat(noise["gram"]).numel() > 400_000
    # One Gaussian release of every site's rows, accounted as such.
    assert rounds[0]["head"]["dp-epsilon"] == pytest.approx(epsilon_after(0, 100, cfg, 1))
    assert rounds[0]["head"]["dp-epsilon"] > 0


def test_dp_sgd_after_the_head_composes_both_releases():
    cfg = FedLoraConfig(dp_noise_multiplier=1.0, head_dp_noise_multiplier=2.0, local_steps=3)
    head_only, sgd_only = epsilon_after(0, 200, cfg, 1), epsilon_after(2, 200, cfg, 0)
    both = epsilon_after(2, 200, cfg, 1)
    assert max(head_only, sgd_only) < both < head_only + sgd_only  # RDP composes tighter
    stats = [HeadStatistics.zeros(4, 3)] * 2
    with pytest.raises(PrivacyBudgetExhausted, match="head statistics release 2"):
        release_head_statistics(stats, 200, cfg.replace(dp_target_epsilon=both), releases=2,
                                train_releases=2)


@pytest.mark.parametrize("changes,message", [
    ({"strategy": "median", "head_mode": "fit"}, "strategy median bounds what a few bad sites"),
    ({"client_dp_noise_multiplier": 1.0, "head_mode": "fit-then-train"},
     "client-level DP noise covers a site's adapter update"),
    ({"strategy": "trimmed-mean", "num_rounds": 0}, "num-rounds=0 runs the head round alone"),
])
def test_head_modes_a_run_cannot_use_are_refused_in_one_line(changes, message):
    with pytest.raises(FedLoraError, match=message) as raised:
        resolve_head_mode(FedLoraConfig(**changes), "mean")
    assert "\n" not in str(raised.value)


def test_auto_fits_mean_pooled_heads_and_trains_the_others():
    assert resolve_head_mode(FedLoraConfig(), "mean") == "fit"
    assert resolve_head_mode(FedLoraConfig(), "cls") == "train"
    assert resolve_head_mode(FedLoraConfig(strategy="median"), "mean") == "train"
    assert resolve_head_mode(FedLoraConfig(head_mode="fit-then-train"), "cls") == "fit-then-train"


def test_a_head_that_reads_every_token_cannot_be_fitted(tiny_llama_dir):
    from common.model import build_lora_model

    lora = build_lora_model(FedLoraConfig(model=str(tiny_llama_dir), lora_r=2), ["a", "b"])
    assert lora.pooling == "cls"  # a Llama folder says nothing of mean pooling
    with pytest.raises(FedLoraError, match="reads every token: use pooling=mean"):
        lora.pooled_feature_dim()


def test_a_malformed_head_reply_is_left_out_by_name(banking_subset, tmp_path, monkeypatch):
    import client.app as client_app

    real = client_app._head_statistics

    def doubled(msg, cfg, runtime):  # one site claims twice the rows it summed
        reply = real(msg, cfg, runtime)
        if runtime.site_id == 0:
            metrics = reply.content["metrics"]
            metrics["num-examples"] = 2 * int(metrics["num-examples"])
        return reply

    monkeypatch.setattr(client_app, "_head_statistics", doubled)
    rounds, _, _ = _run(_cfg(banking_subset, tmp_path, num_rounds=0))
    assert rounds[0]["head"]["sites"] == SITES - 1
    (dropped,) = rounds[0]["dropped"]
    assert "head statistics count" in dropped["reason"] and "training rows" in dropped["reason"]


def test_config_refuses_head_settings_that_cannot_apply():
    for changes, message in [
        ({"pooling": "max"}, "config pooling must be one of auto, mean, cls"),
        ({"task": "causal-lm", "head_mode": "fit"}, "task causal-lm has none"),
        ({"task": "causal-lm", "pooling": "mean"}, "pooling=mean applies to classification"),
        ({"num_rounds": 0, "head_mode": "train"}, "num-rounds=0 runs the head round alone"),
        ({"head_dp_noise_multiplier": 1.0}, "training rounds would send updates without DP"),
        ({"head_refit_every": -1}, "head-refit-every must not be negative"),
    ]:
        with pytest.raises(FedLoraError, match=message):
            FedLoraConfig(**changes)
    FedLoraConfig(head_dp_noise_multiplier=1.0, num_rounds=0)  # the head alone, private
    json.dumps(FedLoraConfig(pooling="mean").to_run_config())
