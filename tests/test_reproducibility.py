"""A run records what it needs to be reproduced, and the same config and seed give the same
metrics and the same adapter on CPU."""

from __future__ import annotations

import json
import subprocess
from importlib import metadata

import pytest
from safetensors.torch import load_file

from common.config import FedLoraConfig
from server.app import run_federation
from simulations.inprocess import InProcessGrid
from tests.conftest import REPO

pytestmark = pytest.mark.usefixtures("task_identity")

TIMING = ("seconds", "eval-seconds", "train-seconds", "train-started-at",
          "train-exchange-seconds", "eval-cpu-seconds", "train-cpu-seconds")


def _without_timing(value):
    if isinstance(value, dict):
        return {k: _without_timing(v) for k, v in value.items() if k not in TIMING}
    if isinstance(value, list):
        return [_without_timing(v) for v in value]
    return value


def _cfg(banking_subset, out, seed=7) -> FedLoraConfig:
    return FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=3,
                         num_rounds=1, local_steps=2, lora_r=4, max_eval_examples=40,
                         fraction_train=0.67, seed=seed, out_dir=str(out))


@pytest.fixture(scope="module")
def three_runs(banking_subset, tmp_path_factory):
    """Seeds 7, 7 and 8: the same config otherwise."""
    from common.flower_compat import set_task_identity

    set_task_identity(run_id=1, task_id=1, node_id=0)  # as task_identity
    runs = []
    root = tmp_path_factory.mktemp("repro")
    for name, seed in (("a", 7), ("b", 7), ("c", 8)):
        cfg = _cfg(banking_subset, root / name, seed)
        runs.append((cfg, run_federation(InProcessGrid(cfg, 3), cfg)))
    return runs


def _comparable(run) -> tuple[list[dict], dict]:
    # Node ids of a simulation are drawn anew by each process: compare by position.
    rounds = [_without_timing({k: v for k, v in r.items() if k != "dropped"})
              for r in run.read_rounds()]
    for r in rounds:
        for client in r["train-per-client"] + r["evaluate-per-client"]:
            client.pop("node", None)
    return rounds, load_file(str(run.final_adapter / "adapter_model.safetensors"))


def test_the_same_seed_gives_the_same_metrics_and_adapter(three_runs):
    (first, adapter_a), (second, adapter_b), (other, adapter_c) = [
        _comparable(run) for _, run in three_runs]
    assert first == second
    assert adapter_a.keys() == adapter_b.keys()
    assert all((adapter_a[k] == adapter_b[k]).all() for k in adapter_a)
    # ... and the seed matters: another one samples, initialises and shuffles differently.
    assert first != other and any((adapter_a[k] != adapter_c[k]).any() for k in adapter_a)


def test_the_run_records_versions_commit_and_seeds_and_each_resume(three_runs):
    cfg, run = three_runs[0]
    started = json.loads((run.path / "environment.json").read_text())["started"]
    assert started["packages"]["torch"] == metadata.version("torch")
    assert started["packages"]["flwr"] == metadata.version("flwr")
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True,
                          text=True, check=True).stdout.strip()
    assert started["app"]["commit"] == head
    assert started["seeds"]["seed"] == 7 and "not-seeded" not in started["seeds"]
    assert json.loads((run.path / "config.json").read_text())["seed"] == 7

    resumed = cfg.replace(num_rounds=2, resume=True)
    run_federation(InProcessGrid(resumed, 3), resumed)
    record = json.loads((run.path / "environment.json").read_text())
    assert record["started"] == started and len(record["resumes"]) == 1
