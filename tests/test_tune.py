"""`fedlora tune`: trials are real (in-process) federations, the objective is their best round,
the study resumes from SQLite, a pruned trial stops its run, and the best config is a file
that both `fedlora simulate` and `flwr run` read."""

from __future__ import annotations

import pytest

from common.config import FedLoraConfig, parse_overrides
from server.app import run_federation
from server.outputs import RunDirectory
from simulations import cli
from simulations.inprocess import InProcessGrid
from simulations.tune import SearchSpace, open_study, run_trial
from tests.conftest import simulate_without_ray

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture
def in_process(monkeypatch):
    simulate_without_ray(monkeypatch)


def _tune(banking_subset, out, trials: int) -> int:
    return cli.main(["tune", "--data", str(banking_subset), "--out", str(out), "--trials",
                     str(trials), "--num-clients", "2", "--rounds", "2", "--strategies",
                     "fedavg", "ffa", "--ranks", "2", "4", "--local-steps", "1", "3",
                     "--run-config",
                     "label-column=category max-train-examples=60 max-eval-examples=30"])


def test_a_study_runs_resumes_and_writes_the_best_config(banking_subset, tmp_path, in_process):
    import optuna

    from common.flower_compat import parse_config_args

    out = tmp_path / "tune"
    assert _tune(banking_subset, out, trials=2) == 0
    assert _tune(banking_subset, out, trials=3) == 0  # continues: one more trial, not three
    study = optuna.load_study(study_name="fedlora", storage=f"sqlite:///{out / 'study.db'}")
    assert len(study.trials) == 3 and sorted(p.name for p in out.glob("trial-*")) == \
        ["trial-000", "trial-001", "trial-002"]
    for trial in study.trials:
        if trial.state == optuna.trial.TrialState.COMPLETE:
            rounds = RunDirectory(trial.user_attrs["run-dir"]).read_rounds()
            assert trial.value == max(r["server"]["accuracy"] for r in rounds)
            saved = FedLoraConfig.from_run_config(
                RunDirectory(trial.user_attrs["run-dir"]).saved_config())
            assert saved.lora_r == trial.params["lora-r"]
            assert saved.strategy == trial.params["strategy"] in ("fedavg", "ffa")
    assert "| 2 |" in (out / "summary.md").read_text()

    best = study.best_trial
    ours = parse_overrides(str(out / "best.toml"))
    flowers = parse_config_args([str(out / "best.toml")])
    assert ours == flowers
    assert ours["learning-rate"] == best.params["learning-rate"]
    assert ours["lora-r"] == best.params["lora-r"] and ours["strategy"] == best.params["strategy"]
    assert ours["label-column"] == "category"
    args = cli.build_parser().parse_args(["simulate", "--run-config", str(out / "best.toml")])
    cfg = cli.config_from_args(args)
    assert cfg.learning_rate == best.params["learning-rate"] and cfg.lora_r == ours["lora-r"]


def test_a_pruned_trial_stops_its_run_after_that_round(banking_subset, tmp_path):
    import optuna

    base = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=2,
                         num_rounds=4, max_train_examples=60, max_eval_examples=30)
    # Accuracy is never above 1: every trial is pruned once past round 1.
    study = optuna.create_study(direction="maximize", pruner=optuna.pruners.ThresholdPruner(
        lower=1.5, n_warmup_steps=1))
    space = SearchSpace(lora_ranks=(2,), strategies=("fedavg",), local_steps=(1, 1))
    study.optimize(lambda t: run_trial(t, base, space, tmp_path, lambda cfg: run_federation(
        InProcessGrid(cfg, 2), cfg)), n_trials=1)
    assert study.trials[0].state == optuna.trial.TrialState.PRUNED
    run = RunDirectory(tmp_path / "trial-000")
    assert [r["round"] for r in run.read_rounds()] == [0, 1, 2]
    assert run.read_summary()["stopped-early"].startswith("stopped on request")
    assert run.read_summary()["stop-reason"] == "stop-requested"


def test_trials_a_killed_process_left_running_are_failed_on_reopening(tmp_path):
    import optuna

    study = open_study(tmp_path, "s", "accuracy", 1)
    study.ask()  # as a process killed mid-trial leaves it
    reopened = open_study(tmp_path, "s", "accuracy", 1)
    assert [t.state for t in reopened.trials] == [optuna.trial.TrialState.FAIL]


def test_bad_tuning_options_are_one_line_errors(tmp_path, capsys):
    assert cli.main(["tune", "--out", str(tmp_path), "--trials", "0"]) == 2
    assert "tune: --trials must be positive" in capsys.readouterr().err
    assert cli.main(["tune", "--out", str(tmp_path), "--run-config",
                     str(tmp_path / "missing.toml")]) == 2
    assert "run-config file" in capsys.readouterr().err
