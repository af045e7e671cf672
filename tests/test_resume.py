"""Kill the server process with SIGKILL mid-run (in a head round, and mid-round), resume, and
get the uninterrupted result."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from client.faults import ENV_VAR as FAULTS
from server.outputs import RunDirectory
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "final_adapter" / "adapter_model.safetensors"))


def _rounds(run_dir: Path) -> list[int]:
    return [r["round"] for r in RunDirectory(run_dir).read_rounds()]


def _kill_tree(proc: subprocess.Popen) -> None:
    parent = psutil.Process(proc.pid)
    tree = [parent] + parent.children(recursive=True)
    for p in tree:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(tree, timeout=20)


def test_a_run_killed_in_and_after_head_rounds_resumes_to_the_same_adapter(banking_subset,
                                                                          tmp_path):
    """Head fitted before round 1 and again after round 2 (the default model: mean pooling),
    strategy exact (its residual is checkpointed too): killed while a site is inside round 0's
    head round (nothing recorded yet: resume starts over), then while round 2, the last,
    trains and refits; every round once and the same final adapter, tensor for tensor."""
    command = [str(BIN / "fedlora"), "simulate", "--num-clients", "3", "--rounds", "2",
               "--data", str(banking_subset), "--partition", "dirichlet", "--alpha", "0.5",
               "--strategy", "exact", "--run-config", "label-column=category lora-r=4 "
               "local-steps=3 max-eval-examples=60 head-mode=fit head-refit-every=2", "--out"]
    reference = tmp_path / "uninterrupted"
    subprocess.run(command + [str(reference)], cwd=REPO, check=True, capture_output=True,
                   timeout=600)

    run = tmp_path / "killed"
    env = {**os.environ, FAULTS: "0:sleep=600@0"}  # site 0 stalls in round 0's head round
    proc = subprocess.Popen(command + [str(run)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    # The server makes the run directory as it starts round 0, whose head round then waits
    # 600 s for site 0: a kill from then on finds nothing recorded.
    while not (run / "config.json").is_file():
        assert proc.poll() is None and time.time() < deadline, "run ended before the kill"
        time.sleep(0.05)
    time.sleep(5)
    assert proc.poll() is None
    _kill_tree(proc)
    assert _rounds(run) == [] and not (run / "checkpoint").exists()

    resume = [str(BIN / "fedlora"), "simulate", "--resume", str(run)]
    proc = subprocess.Popen(resume, cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    while len(_rounds(run)) < 2:  # rounds 0 and 1 recorded: kill during round 2
        assert proc.poll() is None and time.time() < deadline + 300, "run ended before the kill"
        time.sleep(0.05)
    _kill_tree(proc)
    assert json.loads((run / "summary.json").read_text())["status"] == "running"
    assert not (run / "final_adapter").exists()
    result = subprocess.run(resume, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]

    rounds = RunDirectory(run).read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]  # every round exactly once
    assert "head" in rounds[0] and "head" in rounds[2] and "head" not in rounds[1]
    expected, resumed = _adapter(reference), _adapter(run)
    assert expected.keys() == resumed.keys()
    for name in expected:
        assert torch.equal(expected[name], resumed[name]), name


def test_resuming_with_another_config_or_nothing_is_refused(tmp_path, capsys):
    from simulations.cli import main

    assert main(["simulate", "--resume", str(tmp_path / "nowhere")]) == 2
    assert "nothing to resume" in capsys.readouterr().err


@pytest.mark.parametrize("change", ["lora-r=16", "strategy=fedavg"])
def test_resume_refuses_a_changed_config(change):
    from common.config import FedLoraConfig, check_resumable
    from common.errors import FedLoraError

    saved = FedLoraConfig(lora_r=4, strategy="exact").to_run_config()
    with pytest.raises(FedLoraError, match="cannot resume with a different config"):
        check_resumable(saved, FedLoraConfig.from_run_config(
            {**saved, **dict([change.split("=")])}))
    check_resumable(saved, FedLoraConfig.from_run_config({**saved, "num-rounds": 9}))


def test_a_run_killed_at_each_write_point_of_its_last_round_resumes_to_the_same_adapter(
        banking_subset, tmp_path):
    """Every file a run writes is published by an os.replace (common/atomic.py); the run is
    killed (os._exit, injected) just before each publication of round 2, the last: its metrics
    line, the checkpoint's two renames, the final and best adapters, the summary. Each time the
    resume records every round once and ends with the uninterrupted run's adapter."""
    killer = [sys.executable, str(REPO / "tests" / "kill_at_write.py")]
    args = ["simulate", "--num-clients", "2", "--rounds", "2", "--data", str(banking_subset),
            "--run-config", "label-column=category max-train-examples=60 max-eval-examples=30 "
            "local-steps=1 batch-size=8", "--out"]
    log = tmp_path / "published.txt"
    reference = tmp_path / "uninterrupted"
    subprocess.run([*killer, "-1", *args, str(reference)], cwd=REPO, check=True, timeout=300,
                   capture_output=True, env={**os.environ, "KILL_AT_WRITE_LOG": str(log)})
    published = [Path(p).name for p in log.read_text().split()]
    # Round 2 begins after round 1's checkpoint is published (round 0's is the first).
    first = [i for i, name in enumerate(published) if name == "checkpoint"][1] + 1
    last_round = published[first:]
    assert {"metrics.jsonl", ".checkpoint.old", "checkpoint", "final_adapter",
            "best_adapter", "summary.json"} <= set(last_round), published
    expected = _adapter(reference)
    for index in range(first, len(published)):
        run = tmp_path / f"killed-before-{index}"
        killed = subprocess.run([*killer, str(index), *args, str(run)], cwd=REPO, timeout=300,
                                capture_output=True)
        assert killed.returncode == 137, (index, killed.stderr[-2000:])
        resumed = subprocess.run([*killer, "-1", "simulate", "--resume", str(run)], cwd=REPO,
                                 timeout=300, capture_output=True, text=True)
        assert resumed.returncode == 0, (published[index], resumed.stderr[-2000:])
        assert _rounds(run) == [0, 1, 2], published[index]
        assert RunDirectory(run).read_summary()["status"] == "completed", published[index]
        adapter = _adapter(run)
        assert adapter.keys() == expected.keys()
        for name in expected:
            assert torch.equal(expected[name], adapter[name]), (published[index], name)
