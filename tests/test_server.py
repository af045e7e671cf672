"""A run that dies is marked failed, keeps what it wrote, and the CLI exits non-zero."""

import json

import pandas as pd
import pytest

from common.config import FedLoraConfig
from common.errors import FedLoraError
from server.app import run_federation
from simulations import cli
from tests.conftest import simulate_without_ray

pytestmark = pytest.mark.usefixtures("task_identity")


class LostGrid:
    """A grid whose connection to the SuperNodes is gone."""

    def get_node_ids(self):
        return [1, 2]

    def send_and_receive(self, messages, timeout=None):
        raise RuntimeError("connection to the SuperLink lost")


@pytest.fixture
def small_config(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"query {i}" for i in range(30)],
                  "label": ["a", "b", "c"] * 10}).to_csv(path, index=False)
    return FedLoraConfig(data=str(path), out_dir=str(tmp_path / "run"), num_clients=2)


def test_a_failing_run_is_marked_failed_and_keeps_round_zero(small_config):
    # A trained head: round 0 needs no site, so the grid fails in round 1.
    with pytest.raises(RuntimeError, match="SuperLink lost"):
        run_federation(LostGrid(), small_config.replace(head_mode="train"))
    run = small_config.out_dir
    summary = json.loads(open(f"{run}/summary.json").read())
    assert summary["status"] == "failed" and "SuperLink lost" in summary["error"]
    rounds = [json.loads(line) for line in open(f"{run}/metrics.jsonl")]
    assert [r["round"] for r in rounds] == [0] and 0 <= rounds[0]["server"]["accuracy"] <= 1
    assert json.loads(open(f"{run}/labels.json").read()) == ["a", "b", "c"]


def test_the_cli_exits_non_zero_when_the_run_fails(small_config, monkeypatch, capsys):
    simulate_without_ray(monkeypatch, LostGrid())
    code = cli.main(["simulate", "--data", small_config.data, "--num-clients", "2",
                     "--out", small_config.out_dir])
    assert code == 1
    err = capsys.readouterr().err
    assert "fedlora: error: run failed: RuntimeError: connection to the SuperLink lost" in err


def test_an_earlier_run_in_the_same_directory_is_kept(small_config, tmp_path):
    from server.outputs import RunDirectory

    first = RunDirectory.create(small_config, ["a", "b"])
    first.append_round({"round": 0, "server": {"accuracy": 0.5}})
    second = RunDirectory.create(small_config, ["a", "b"])
    assert second.path == first.path and second.read_rounds() == []
    [kept] = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert RunDirectory(kept).read_rounds() == [{"round": 0, "server": {"accuracy": 0.5}}]


def test_a_run_directory_in_use_by_another_process_is_neither_taken_nor_moved(small_config,
                                                                              tmp_path):
    import subprocess
    import sys

    from server.outputs import LOCK_FILE, RunDirectory, check_not_in_use

    live = tmp_path / "run"
    live.mkdir()
    for name in ("config.json", "summary.json", LOCK_FILE):
        (live / name).write_text("{}")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)",
         str(live / LOCK_FILE)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        for attempt in (lambda: RunDirectory.create(small_config, ["a", "b"]),
                        lambda: RunDirectory.reopen(small_config.replace(resume=True)),
                        lambda: check_not_in_use(live)):
            with pytest.raises(FedLoraError, match="is in use by another fedlora process"):
                attempt()
        assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv", "run"]
        assert (live / "summary.json").read_text() == "{}"
    finally:
        holder.kill()
        holder.wait()
    # The holder died: its lock went with it, and a new run moves the old one aside.
    assert RunDirectory.create(small_config, ["a", "b"]).read_summary() == {"status": "running"}
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("run.old-")]


def test_a_failed_resume_keeps_what_the_finished_run_wrote(small_config, capsys):
    with pytest.raises(RuntimeError, match="SuperLink lost"):
        run_federation(LostGrid(), small_config.replace(head_mode="train"))
    run = small_config.out_dir
    finished = {"status": "completed", "rounds": 0, "final": {"accuracy": 0.5},
                "best": {"accuracy": 0.6}, "data-checks": {"rows": 30}}
    with open(f"{run}/summary.json", "w") as handle:
        json.dump(finished, handle)
    with open(f"{run}/checkpoint/state.json", "w") as handle:
        handle.write('{"round": 0, "rng')  # cut short
    with pytest.raises(FedLoraError, match="checkpoint .* is corrupt: state.json"):
        run_federation(LostGrid(), small_config.replace(head_mode="train", resume=True))
    summary = json.loads(open(f"{run}/summary.json").read())
    assert {k: v for k, v in summary.items() if k != "resume-error"} == finished
    assert "is corrupt" in summary["resume-error"]
    # A config.json cut short is one line, not a JSONDecodeError traceback.
    config = open(f"{run}/config.json").read()
    with open(f"{run}/config.json", "w") as handle:
        handle.write(config[: len(config) // 2])
    assert cli.main(["simulate", "--resume", run]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith("fedlora: error: ") and "config.json cannot be read" in line
