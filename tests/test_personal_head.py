"""Personal heads (issue 23): the closed-form fit against references, the pull chosen on the
site's rows, a site's evaluation with its personal head, which never leaves the site, and the
saved head loaded by `fedlora evaluate` and `fedlora export`."""

from __future__ import annotations

import math

import pytest
import torch

import client.app as client_app
from common.adapters import read_personal_head
from common.config import FedLoraConfig
from common.data import load_splits, resolve_labels
from common.errors import FedLoraError
from common.flower_compat import recorddict_to_proto, set_task_identity
from common.model import build_lora_model
from common.personal_head import (
    LinearHead,
    accuracy,
    choose_local_head,
    choose_personal_head,
    fit_personal_head,
    nearest_within,
)
from tests.conftest import site_message


def _rows(means: torch.Tensor, counts: list[int], seed: int, noise: float = 1.0):
    """Gaussian rows around each label's mean: `counts[c]` rows of label c."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)])
    features = means[labels] + noise * torch.randn(len(labels), means.shape[1],
                                                   generator=generator, dtype=torch.float64)
    return features, labels


def _reference_fit(features, labels, num_labels, lam, anchor_theta, scale):
    """(Phi^T Phi + lam I) Theta = scale Phi^T Y_c + lam Theta_g, solved directly."""
    phi = torch.cat([features, torch.ones(len(labels), 1, dtype=torch.float64)], 1)
    y = torch.nn.functional.one_hot(labels, num_labels).double() - 1.0 / num_labels
    lhs = phi.T @ phi + lam * torch.eye(phi.shape[1], dtype=torch.float64)
    return torch.linalg.solve(lhs, scale * phi.T @ y + lam * anchor_theta), phi, y


MEANS = torch.tensor([[2.0, 0, 0, 0], [0, 2.0, 0, 0], [0, 0, 2.0, 0], [1.5, 0, 0, 1.0]],
                     dtype=torch.float64)


def test_mu_zero_is_the_sites_own_least_squares_fit_and_infinity_the_global_head():
    features, labels = _rows(MEANS, [40, 30, 20, 10], seed=0)
    anchor = LinearHead(torch.randn(4, 4, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(1)),
                        torch.tensor([0.5, -0.2, 0.1, 0.0], dtype=torch.float64))
    theta_g = anchor.theta
    _, phi, y = _reference_fit(features, labels, 4, 0.0, theta_g, 1.0)
    scale = float((phi @ theta_g).norm() / y.norm())
    own = torch.linalg.lstsq(phi, scale * y).solution
    assert torch.allclose(fit_personal_head(features, labels, anchor, 0.0).theta, own,
                          atol=1e-8)
    # The global head itself, centred over the labels: the same logits up to a per-row shift.
    pulled = fit_personal_head(features, labels, anchor, math.inf)
    shift = anchor.logits(features) - pulled.logits(features)
    assert torch.allclose(shift, shift[:, :1].expand_as(shift), atol=1e-10)
    assert torch.allclose(fit_personal_head(features, labels, anchor, 1e9).theta, theta_g,
                          atol=1e-5)


def test_a_finite_pull_solves_the_proximal_ridge_equation():
    features, labels = _rows(MEANS, [25, 25, 25, 25], seed=2)
    anchor = LinearHead(torch.randn(4, 4, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(3)),
                        torch.zeros(4, dtype=torch.float64))
    mu = 0.3
    phi = torch.cat([features, torch.ones(len(labels), 1, dtype=torch.float64)], 1)
    lam = mu * float(torch.trace(phi.T @ phi)) / phi.shape[1]
    y = torch.nn.functional.one_hot(labels, 4).double() - 0.25
    scale = float((phi @ anchor.theta).norm() / y.norm())
    expected, _, _ = _reference_fit(features, labels, 4, lam, anchor.theta, scale)
    assert torch.allclose(fit_personal_head(features, labels, anchor, mu).theta, expected,
                          atol=1e-8)


def test_a_skewed_site_gets_a_head_better_on_its_own_rows_and_a_typical_site_the_global():
    # The global head of the pooled rows (four labels, even) confuses labels 0 and 3, whose
    # means are close; a site that holds label 0 and hardly any 3 gains from its own prior.
    pooled, pooled_labels = _rows(MEANS, [200, 200, 200, 200], seed=4)
    global_head = choose_local_head(pooled, pooled_labels, 4, seed=0).head
    site, site_labels = _rows(MEANS, [150, 60, 40, 3], seed=5)
    held, held_labels = _rows(MEANS, [600, 240, 160, 12], seed=6)
    fit = choose_personal_head(site, site_labels, global_head, seed=0)
    assert math.isfinite(fit.mu) or fit.prior_weight > 0  # moved away from the global head
    assert accuracy(fit.head, held, held_labels) > accuracy(global_head, held, held_labels) + 0.02
    # A site whose rows are distributed as the pooled ones keeps (nearly) the global head.
    typical, typical_labels = _rows(MEANS, [50, 50, 50, 50], seed=7)
    kept = choose_personal_head(typical, typical_labels, global_head, seed=0)
    test, test_labels = _rows(MEANS, [500, 500, 500, 500], seed=8)
    assert accuracy(kept.head, test, test_labels) >= accuracy(global_head, test,
                                                               test_labels) - 0.01


def test_a_pair_leaves_the_global_head_only_for_a_gain_beyond_one_standard_error():
    # 100 rows, 3 passes: the best pair hits 90% of 300, its standard error is
    # sqrt(0.9 x 0.1 / 100) = 3 points, 9 hits of 300.
    anchor, prior_shift, pull = (0.0, math.inf), (1.0, math.inf), (0.5, 0.1)
    near = {anchor: 258, prior_shift: 265, pull: 270}
    assert nearest_within(near, rows=100, repeats=3, within_se=1.0) == prior_shift
    assert nearest_within(near, rows=100, repeats=3, within_se=0.0) == pull  # plain argmax
    clear = {anchor: 250, prior_shift: 255, pull: 270}
    assert nearest_within(clear, rows=100, repeats=3, within_se=1.0) == pull
    tied = {anchor: 270, prior_shift: 270, pull: 270}  # ties: the global side
    assert nearest_within(tied, rows=100, repeats=3, within_se=0.0) == anchor
    # A perfect best still tolerates one row's worth: sqrt(1/100) x 100 rows = 1 hit a pass.
    perfect = {anchor: 297, pull: 300}
    assert nearest_within(perfect, rows=100, repeats=3, within_se=1.0) == anchor
    assert nearest_within({anchor: 296, pull: 300}, rows=100, repeats=3, within_se=1.0) == pull


def test_the_prior_weight_adds_the_sites_smoothed_log_label_prior_to_the_global_biases():
    features, labels = _rows(MEANS, [60, 30, 9, 0], seed=10)
    anchor = LinearHead(torch.eye(4, dtype=torch.float64), torch.zeros(4, dtype=torch.float64))
    moved = fit_personal_head(features, labels, anchor, math.inf, prior_weight=2.0)
    prior = torch.log((torch.tensor([60, 30, 9, 0.0]) + 0.5) / (99 + 0.5 * 4)).double()
    difference = moved.logits(features) - anchor.logits(features)
    expected = 2.0 * prior - (2.0 * prior).mean()
    assert torch.allclose(difference - difference.mean(1, keepdim=True), expected.expand_as(
        difference), atol=1e-10)


def test_the_local_only_head_is_the_sites_own_ridge_fit():
    features, labels = _rows(MEANS, [30, 30, 30, 30], seed=9)
    fit = choose_local_head(features, labels, 4, seed=0)
    phi = torch.cat([features, torch.ones(len(labels), 1, dtype=torch.float64)], 1)
    lam = fit.mu * float(torch.trace(phi.T @ phi)) / phi.shape[1]
    expected, _, _ = _reference_fit(features, labels, 4, lam,
                                    torch.zeros(5, 4, dtype=torch.float64), 1.0)
    assert torch.allclose(fit.head.theta, expected - expected.mean(1, keepdim=True), atol=1e-8)


def test_bad_personalisation_settings_get_one_line_each(tiny_llama_dir):
    with pytest.raises(ValueError, match="mu must be >= 0"):
        fit_personal_head(torch.zeros(3, 2), torch.tensor([0, 1, 0]),
                          LinearHead.zeros(2, 2), -1.0)
    for bad in ("-0.5", "strong", "inf"):
        with pytest.raises(FedLoraError, match="personal-mu must be auto or a number >= 0"):
            FedLoraConfig.from_run_config({"personal-mu": bad})
    assert FedLoraConfig.from_run_config({"personal-mu": 0.5}).personal_mu_value == 0.5
    with pytest.raises(FedLoraError) as err:
        FedLoraConfig(task="causal-lm", model=str(tiny_llama_dir), personal_head=True)
    assert "personal-head applies to classification" in str(err.value)
    assert "\n" not in str(err.value)
    with pytest.raises(FedLoraError, match="site-eval-rows=test deals test rows out by label; "
                                           "task causal-lm has no labels"):
        FedLoraConfig(task="causal-lm", model=str(tiny_llama_dir), site_eval_rows="test")


@pytest.fixture
def personal_site(banking_subset, tmp_path, monkeypatch):
    set_task_identity(run_id=1, task_id=1, node_id=0)
    monkeypatch.setattr(client_app, "_CACHE", None)
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=3,
                        local_steps=2, personal_head=True, out_dir=str(tmp_path / "run"))
    labels = resolve_labels(cfg, load_splits(cfg))
    state = build_lora_model(cfg, labels).trainable_state()
    return cfg, labels, state


def test_a_site_scores_its_personal_head_keeps_it_and_never_sends_it(personal_site, tmp_path):
    cfg, labels, state = personal_site
    reply = client_app.evaluate(*site_message(cfg, labels, state, "evaluate", 2))
    metrics = reply.content["metrics"]
    # The global head here is the untrained initial one: chance on 10 labels.
    assert metrics["eval-personal-accuracy"] > metrics["eval-accuracy"] + 0.3
    assert 0 <= metrics["eval-local-head-accuracy"] <= 1
    assert metrics["partition-id"] == 0
    assert list(reply.content.array_records) == []  # metrics only
    saved = tmp_path / "run" / "sites" / "site-0"
    head = read_personal_head(saved, num_labels=len(labels), dim=384)
    global_weight = next(t for n, t in state.items() if ".lora_" not in n and "weight" in n)
    assert not torch.allclose(head["weight"], global_weight)

    sent = recorddict_to_proto(reply.content).SerializeToString()
    trained = client_app.train(*site_message(cfg, labels, state, "train", 3))
    sent += recorddict_to_proto(trained.content).SerializeToString()
    for tensor in head.values():  # no row of the personal head in either reply's bytes
        for row in tensor.reshape(-1, tensor.shape[-1]):
            assert row.numpy().tobytes() not in sent


def test_a_corrupt_or_misshapen_personal_head_is_named(tmp_path):
    from common.adapters import write_personal_head

    folder = tmp_path / "site"
    write_personal_head(folder, torch.zeros(3, 8), torch.zeros(3), {"round": "1"})
    with pytest.raises(FedLoraError, match="weight is \\(3, 8\\), this model's head needs"):
        read_personal_head(folder, num_labels=4, dim=8)
    (folder / "personal_head.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(FedLoraError, match="does not load"):
        read_personal_head(folder, num_labels=3, dim=8)
    with pytest.raises(FedLoraError, match="does not exist"):
        read_personal_head(tmp_path / "nowhere", num_labels=3, dim=8)


def test_after_the_last_round_a_site_keeps_a_personal_adapter_it_never_sends(personal_site):
    from safetensors.torch import load_file

    from common.adapters import load_adapter_model, read_saved_adapter

    cfg, labels, state = personal_site
    cfg = cfg.replace(personal_steps=3, num_rounds=2)
    reply = client_app.evaluate(*site_message(cfg, labels, state, "evaluate", 2))
    assert 0 <= reply.content["metrics"]["eval-personal-adapter-accuracy"] <= 1
    # The model the site goes on with is the global one it received.
    resident = client_app._CACHE.sites[0].lora.trainable_state()
    assert all(torch.equal(resident[n], state[n]) for n in state)

    folder = cfg.out_dir + "/sites/site-0/personal_adapter"
    model, _ = load_adapter_model(read_saved_adapter(folder))  # a PEFT adapter folder
    personal = load_file(folder + "/adapter_model.safetensors")
    trained_lora = [t for n, t in personal.items() if "lora_B" in n]
    assert trained_lora and any(t.abs().sum() > 0 for t in trained_lora)  # B starts at zero
    # Adam moves a tensor by at most ~lr a step in its first steps (the first by exactly lr):
    # B, from zero, stayed within 3 steps of a fifth of the sites' learning rate.
    assert cfg.effective_personal_lr() == cfg.learning_rate / 5
    assert max(float(t.abs().max()) for t in trained_lora) <= 1.5 * 3 * cfg.learning_rate / 5
    sent = recorddict_to_proto(reply.content).SerializeToString()
    trained = client_app.train(*site_message(cfg, labels, state, "train", 3))
    sent += recorddict_to_proto(trained.content).SerializeToString()
    for tensor in personal.values():
        assert tensor.reshape(-1)[:16].numpy().tobytes() not in sent

    with pytest.raises(FedLoraError, match="set personal-head=true too"):
        FedLoraConfig(personal_steps=5)
    assert FedLoraConfig(personal_head=True, personal_steps=5,
                         personal_learning_rate=0.002).effective_personal_lr() == 0.002
    with pytest.raises(FedLoraError, match="personal-learning-rate is the personal adapter's: "
                                           "set personal-steps too"):
        FedLoraConfig(personal_head=True, personal_learning_rate=0.002)


def test_a_site_keeps_its_head_in_its_own_folder(tmp_path, monkeypatch):
    from client.personal import personal_folder

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    simulated = FedLoraConfig(out_dir=str(tmp_path / "run"))
    assert personal_folder(simulated, None, run_id=7, site_id=3) == tmp_path / "run/sites/site-3"
    # A deployed site: its node-config personal-dir, or ~/.fedlora/personal; a folder a run.
    assert personal_folder(simulated, str(tmp_path / "mine"), 7, 3) == tmp_path / "mine/run-7"
    assert personal_folder(simulated, "", 7, 3) == tmp_path / "home/.fedlora/personal/run-7"
    # `flwr run` without an out-dir: the site does not know the server's run directory.
    assert personal_folder(FedLoraConfig(), None, 7, 3) == \
        tmp_path / "home/.fedlora/personal/run-7/site-3"


def test_with_site_eval_rows_test_each_site_scores_its_share_of_the_test_split(
        banking_subset, tmp_path, monkeypatch):
    """site-eval-rows=test: a simulated site evaluates (global, personal and local-only head)
    on the test rows dealt to it by its share of each label, the local-only baseline on the
    same rows; a deployed site and a bad value get one line each."""
    from common.data import columns
    from common.partitioning import deal_by_label, partition_indices
    from simulations.baselines import local_only_sites

    set_task_identity(run_id=1, task_id=1, node_id=0)
    monkeypatch.setattr(client_app, "_CACHE", None)
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=3,
                        num_rounds=1, local_steps=2, personal_head=True, partition="dirichlet",
                        alpha=0.5, site_eval_rows="test", out_dir=str(tmp_path / "run"))
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits)
    (train_labels,) = columns(splits.train, "target")
    expected = deal_by_label([[train_labels[i] for i in p]
                              for p in partition_indices(splits.train, cfg)],
                             columns(splits.test, "target")[0], cfg.seed)
    assert sum(map(len, expected)) > 3 * 10  # more than the 10% validation rows would be
    state = build_lora_model(cfg, labels).trainable_state()
    scored = {}
    for site in range(3):
        metrics = client_app.evaluate(*site_message(cfg, labels, state, "evaluate", 1,
                                                    partition=site)).content["metrics"]
        scored[site] = int(metrics["num-examples"])
        assert scored[site] == len(expected[site])
        for key in ("eval-accuracy", "eval-personal-accuracy", "eval-local-head-accuracy"):
            assert math.isclose(metrics[key] * scored[site], round(metrics[key] * scored[site]),
                                abs_tol=1e-6)  # a count of those rows
    alone = {s["partition-id"]: int(s["num-examples"]) for s in local_only_sites(cfg)}
    assert alone == scored

    monkeypatch.setattr(client_app, "_CACHE", None)
    msg, context = site_message(cfg, labels, state, "evaluate", 1)
    context.node_config = {"data-path": str(banking_subset)}
    with pytest.raises(FedLoraError, match="site-eval-rows=test deals the data set's test "
                                           "split out to simulated sites"):
        client_app.evaluate(msg, context)
    with pytest.raises(FedLoraError, match="config site-eval-rows must be one of "
                                           "validation, test; got 'val'"):
        FedLoraConfig(site_eval_rows="val")


def test_simulate_local_only_trains_each_site_alone_for_the_report(banking_subset, tmp_path,
                                                                   monkeypatch, capsys):
    """`fedlora simulate --local-only`: after the federation each site trains alone and is
    scored on the rows its evaluation scored; the report lists them. Not for causal LM."""
    import json
    from pathlib import Path

    from server.outputs import RunDirectory
    from server.report import write_report
    from simulations import cli
    from tests.conftest import simulate_without_ray

    set_task_identity(run_id=1, task_id=1, node_id=0)
    monkeypatch.setattr(client_app, "_CACHE", None)
    simulate_without_ray(monkeypatch)
    out = tmp_path / "run"
    argv = ["simulate", "--data", str(banking_subset), "--num-clients", "2", "--rounds", "1",
            "--out", str(out), "--local-only", "--run-config",
            "label-column=category local-steps=2 max-eval-examples=30"]
    assert cli.main(argv) == 0
    alone = json.loads((out / "local_only.json").read_text())
    sites = alone["sites"]
    assert alone["rounds"] == 1
    federated = RunDirectory(out).read_rounds()[-1]["evaluate-per-client"]
    assert {s["partition-id"]: s["num-examples"] for s in sites} == \
        {int(e["partition-id"]): int(e["num-examples"]) for e in federated}
    accuracies = sorted(s["accuracy"] for s in sites)
    assert len(accuracies) == 2 and all(0 <= a <= 1 for a in accuracies)
    assert f"local-only: worst site {accuracies[0]:.4f}" in capsys.readouterr().out
    page = Path(write_report(out)).read_text()
    assert f"<td>local-only training (each site alone)</td><td>2</td><td>{accuracies[0]:.4g}" \
        in page

    capsys.readouterr()
    assert cli.main(["simulate", "--task", "causal-lm", "--data", str(banking_subset),
                     "--out", str(tmp_path / "lm"), "--local-only"]) == 2
    assert capsys.readouterr().err.strip() == ("fedlora: error: --local-only compares the "
                                               "sites' accuracy: classification only, not "
                                               "task causal-lm")
