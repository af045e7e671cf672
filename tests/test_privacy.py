"""Example-level DP-SGD on a site: the accountant against a hand computation, training that
leaves no hooks behind, the budget refusal, and a federation that ends when budgets are spent."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from client.privacy import PrivacyBudgetExhausted, epsilon_after, train_adapter_private
from common.config import FedLoraConfig
from common.data import load_splits, resolve_labels, tokenize
from common.errors import FedLoraError
from common.metrics import evaluate_examples
from common.model import build_lora_model
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def test_epsilon_of_full_batch_steps_matches_the_gaussian_mechanism_by_hand():
    """q = 1: T steps of the Gaussian mechanism have RDP T*a/(2 sigma^2) at order a; Opacus
    converts with Balle et al. (2020): eps = rdp - (log delta + log a)/(a - 1) + log((a-1)/a)."""
    sigma, steps, delta = 2.0, 12, 1e-5
    cfg = FedLoraConfig(dp_noise_multiplier=sigma, batch_size=100, local_steps=steps,
                        dp_delta=delta)
    orders = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
    by_hand = min(steps * a / (2 * sigma**2) - (math.log(delta) + math.log(a)) / (a - 1)
                  + math.log((a - 1) / a) for a in orders)
    assert epsilon_after(1, 100, cfg) == pytest.approx(by_hand, rel=1e-9)
    # More rounds, more noise, sub-sampling: epsilon moves the right way.
    assert epsilon_after(2, 100, cfg) > epsilon_after(1, 100, cfg)
    assert epsilon_after(1, 100, cfg.replace(dp_noise_multiplier=4.0)) < by_hand
    assert epsilon_after(1, 1000, cfg) < by_hand  # q = 0.1


@pytest.fixture(scope="module")
def site(banking_subset, tiny_llama_dir):
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category",
                        model=str(tiny_llama_dir), lora_r=4, local_steps=30, batch_size=16,
                        learning_rate=0.01, dp_noise_multiplier=0.6, dp_clip_norm=1.0)
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits)
    lora = build_lora_model(cfg, labels)
    return cfg, lora, tokenize(splits.train, lora.tokenizer, cfg, labels), \
        tokenize(splits.test, lora.tokenizer, cfg, labels)


def test_dp_sgd_learns_and_leaves_a_plain_model(site):
    cfg, lora, train, test = site
    pad = lora.tokenizer.pad_token_id
    before = {n: p.clone() for n, p in lora.trainable_state().items()}
    loss_before = evaluate_examples(lora.model, train, batch_size=64, pad_id=pad,
                                    device=lora.device, classification=True)["loss"]
    stats = train_adapter_private(lora.model, train, cfg, releases=1, seed=0, pad_id=pad,
                                  device=lora.device)
    loss_after = evaluate_examples(lora.model, train, batch_size=64, pad_id=pad,
                                   device=lora.device, classification=True)["loss"]
    assert loss_after < loss_before - 0.05, (loss_before, loss_after)
    assert stats["epsilon"] == pytest.approx(epsilon_after(1, len(train), cfg))
    assert 0 < stats["epsilon"] < 100 and stats["steps"] == 30
    # Poisson sampling: about batch-size examples a step.
    assert 0.7 * 30 * 16 < stats["examples-seen"] < 1.3 * 30 * 16
    assert any(not torch.equal(before[n], p) for n, p in lora.trainable_state().items())
    # No Opacus hooks or per-sample gradients are left on the model.
    lora.model.train()
    from common.data import batches

    batch = next(batches(train, 8, pad))
    lora.model(**batch).loss.backward()
    assert not any(hasattr(p, "grad_sample") for p in lora.model.parameters())
    lora.model.zero_grad(set_to_none=True)


def test_the_noise_is_the_sites_own_not_the_runs_seed(site):
    """The coordinator knows the run's seed: noise drawn from it could be subtracted again."""
    cfg, lora, train, _ = site
    start = {n: p.clone() for n, p in lora.trainable_state().items()}
    updates = []
    for _ in range(2):
        lora.load_trainable_state(start)
        train_adapter_private(lora.model, train, cfg.replace(local_steps=2), releases=1, seed=7,
                              pad_id=lora.tokenizer.pad_token_id, device=lora.device)
        updates.append({n: p.clone() for n, p in lora.trainable_state().items()})
    assert any(not torch.equal(updates[0][n], updates[1][n]) for n in start)


def test_a_site_refuses_the_round_that_would_exceed_its_budget(site):
    cfg, lora, train, _ = site
    eps_1, eps_2 = epsilon_after(1, len(train), cfg), epsilon_after(2, len(train), cfg)
    limited = cfg.replace(dp_target_epsilon=(eps_1 + eps_2) / 2)
    before = {n: p.clone() for n, p in lora.trainable_state().items()}
    with pytest.raises(PrivacyBudgetExhausted,
                       match="privacy budget reached: training release 2"):
        train_adapter_private(lora.model, train, limited, releases=2, seed=0,
                              pad_id=lora.tokenizer.pad_token_id, device=lora.device)
    assert all(torch.equal(before[n], p) for n, p in lora.trainable_state().items())


@pytest.mark.parametrize("change, message", [
    ({"strategy": "fedprox"}, "proximal term"),
    ({"grad_accum_steps": 2}, "grad-accum-steps=1"),
    ({"dp_delta": 1.0}, "dp-delta in"),
    ({"dp_noise_multiplier": 0.0, "dp_target_epsilon": 3.0}, "needs differential privacy"),
    ({"task": "causal-lm"}, "loss per example"),
])
def test_dp_config_errors(change, message):
    with pytest.raises(FedLoraError, match=message):
        FedLoraConfig(**{"dp_noise_multiplier": 1.0, **change})


def test_a_federation_logs_epsilon_and_ends_when_budgets_are_spent(banking_subset,
                                                                    tiny_llama_dir, tmp_path):
    """Round 1 fits every site's budget, round 2 would not: the run ends cleanly after round 1
    with round 1's adapter and says why."""
    n_train = int(len(pd.read_csv(banking_subset / "train.csv")) / 3 * 0.9)  # a site's rows
    cfg = FedLoraConfig(local_steps=4, batch_size=16, dp_noise_multiplier=1.0)
    target = (epsilon_after(1, n_train, cfg) + epsilon_after(2, n_train, cfg)) / 2
    out = tmp_path / "run"
    result = subprocess.run(
        [str(BIN / "fedlora"), "simulate", "--num-clients", "3", "--rounds", "3", "--data",
         str(banking_subset), "--model", str(tiny_llama_dir), "--out", str(out),
         "--run-config", f"label-column=category lora-r=4 local-steps=4 batch-size=16 "
         f"max-eval-examples=60 fraction-evaluate=0 round-retries=3 "
         f"dp-noise-multiplier=1.0 dp-target-epsilon={target}"],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rounds = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    epsilons = [c["dp-epsilon"] for c in rounds[1]["train-per-client"]]
    assert len(epsilons) == 3 and all(0 < e <= target for e in epsilons)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == 1
    assert "reached dp-target-epsilon" in summary["stopped-early"]
    assert summary["stop-reason"] == "privacy-budget"
    assert "stopped after round 1" in result.stdout
    assert (out / "final_adapter" / "adapter_config.json").is_file()


def test_retried_rounds_stay_counted_as_releases_after_a_resume(banking_subset, tiny_llama_dir,
                                                                 tmp_path, task_identity,
                                                                 monkeypatch):
    """Sites count every training request, retries included, as a DP-SGD release; the count
    is checkpointed, so a resumed run does not hand a site a smaller release number."""
    import client.app
    from server.app import run_federation
    from server.checkpoint import load_run_state
    from simulations.inprocess import InProcessGrid

    releases_seen, failed = [], []

    def first_attempt_fails(site_id, server_round):
        if server_round == 1 and site_id == 1 and not failed:
            failed.append(True)
            return "raise"
        return None

    original_train = client.app.train_adapter_private

    def recording_train(*args, releases, **kwargs):
        releases_seen.append(releases)
        return original_train(*args, releases=releases, **kwargs)

    monkeypatch.setattr(client.app, "fault_for", first_attempt_fails)
    monkeypatch.setattr(client.app, "train_adapter_private", recording_train)
    cfg = FedLoraConfig(data=str(banking_subset), model=str(tiny_llama_dir),
                        label_column="category", lora_r=4, local_steps=2, num_clients=3,
                        min_train_clients=3, min_evaluate_clients=3, min_available_clients=3,
                        max_eval_examples=30, round_retries=1, num_rounds=1,
                        dp_noise_multiplier=1.0, out_dir=str(tmp_path / "run"))
    run = run_federation(InProcessGrid(cfg, 3), cfg)
    saved = load_run_state(run.checkpoint_dir).parts["run"]["retried-attempts"]
    assert int(saved[0]) == 1
    releases_seen.clear()
    resumed = cfg.replace(num_rounds=2, resume=True)
    run_federation(InProcessGrid(resumed, 3), resumed)
    assert releases_seen == [3, 3, 3]  # round 2 + the retry of round 1, not 2
