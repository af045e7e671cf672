"""Bad input: one line naming the problem, a non-zero exit, no traceback, nothing written, and
Ray (which starts while the input is checked) stopped again."""

import subprocess
import sys

import pandas as pd
import pytest

from simulations import runner
from simulations.cli import main
from tests.conftest import REPO


@pytest.fixture
def small_csv(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"query {i}" for i in range(12)],
                  "label": ["a", "b", "c"] * 4}).to_csv(path, index=False)
    return path


# found_by: "options" (before Ray starts) or "checks" (the input checks, while Ray starts).
@pytest.mark.parametrize("args, fragment, found_by", [
    (["--data", "/no/such/data.csv"], "data file or folder '/no/such/data.csv' does not exist",
     "checks"),
    (["--run-config", "label-column=intent"], "has no column 'intent' (set label-column",
     "checks"),
    (["--model", "no-such-org/no-such-model"], "unknown model 'no-such-org/no-such-model'",
     "checks"),
    (["--model", "./no_such_model_dir"], "model folder './no_such_model_dir' does not exist",
     "checks"),
    (["--run-config", "lora-r=0"], "lora-r must be a positive integer, got 0", "options"),
    (["--run-config", "lora-r=-2"], "lora-r must be a positive integer, got -2", "options"),
    (["--run-config", "lora-r=4096"], "LoRA rank 4096 exceeds the model's hidden size 384",
     "checks"),
    (["--num-clients", "7"], "7 clients need at least 14 training examples, the data has 10",
     "checks"),
    (["--rounds", "-1"], "num-rounds must not be negative, got -1", "options"),
    (["--run-config", "pooling=max"], "pooling must be one of auto, mean, cls; got 'max'",
     "options"),
    (["--task", "causal-lm", "--run-config", "head-mode=fit"],
     "head-mode=fit fits a classification head; task causal-lm has none", "options"),
    (["--strategy", "median", "--run-config", "head-mode=fit"],
     "head-mode=fit fits the head from summed statistics; strategy median bounds", "checks"),
    (["--bogus-option"], "unrecognized arguments: --bogus-option", "options"),
    (["--run-config", "no-such-key=1"], "unknown config key 'no-such-key'", "options"),
    (["--partition", "zipf"], "invalid choice: 'zipf'", "options"),
])
def test_bad_input_gives_one_clear_line(small_csv, tmp_path, capsys, monkeypatch, args,
                                        fragment, found_by, pool_folders_in):
    argv = ["simulate", "--data", str(small_csv), "--num-clients", "2", "--out",
            str(tmp_path / "run")] + args
    _assert_refused(argv, fragment, found_by, capsys, monkeypatch)
    assert not (tmp_path / "run").exists()  # nothing written


def _assert_refused(argv, fragment, found_by, capsys, monkeypatch):
    ray_calls: list[str] = []
    monkeypatch.setattr(runner, "start_ray",
                        lambda cfg, address=None, pool=None: ray_calls.append("start"))
    monkeypatch.setattr(runner, "stop_ray", lambda: ray_calls.append("stop"))
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("fedlora: error: ") and fragment in lines[0], lines[0]
    # Found by the checks that run while Ray starts, so Ray was stopped again; a ServerApp
    # that had started would have called no stop here.
    assert ray_calls == (["start", "stop"] if found_by == "checks" else [])


def test_a_test_split_of_no_rows_is_found_before_the_run(small_csv, tmp_path, capsys,
                                                         monkeypatch, pool_folders_in):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text(small_csv.read_text())
    (folder / "test.csv").write_text("text,label\n")
    _assert_refused(["simulate", "--data", str(folder), "--num-clients", "2", "--out",
                     str(tmp_path / "run")],
                    "the test split of data", "checks", capsys, monkeypatch)


def test_a_resume_with_a_changed_config_is_found_before_the_run(small_csv, tmp_path, capsys,
                                                                monkeypatch, pool_folders_in):
    from common.config import FedLoraConfig

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(FedLoraConfig(data=str(small_csv), num_clients=2,
                                                   out_dir=str(run)).to_json())
    (run / "summary.json").write_text('{"status": "failed"}')
    _assert_refused(["simulate", "--resume", str(run), "--run-config", "lora-r=4"],
                    "cannot resume with a different config: lora-r", "checks", capsys,
                    monkeypatch)


@pytest.mark.parametrize("kind", ["folder of other files", "file"])
def test_an_out_dir_that_holds_no_run_is_refused_and_left_alone(small_csv, tmp_path, capsys,
                                                                 monkeypatch, kind,
                                                                 pool_folders_in):
    monkeypatch.setattr(runner, "start_ray", lambda cfg, address=None, pool=None: None)
    monkeypatch.setattr(runner, "stop_ray", lambda: None)
    out = tmp_path / "home"
    if kind == "file":
        out.write_text("notes")
    else:
        out.mkdir()
        (out / "notes.txt").write_text("notes")
    assert main(["simulate", "--data", str(small_csv), "--num-clients", "2", "--out",
                 str(out)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert line.startswith(f"fedlora: error: out-dir '{out}' ")
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("home")] == ["home"]
    assert (out.read_text() if kind == "file" else (out / "notes.txt").read_text()) == "notes"


def test_the_console_command_exits_non_zero_without_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "--data", str(tmp_path / "x.csv")],
        cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr + result.stdout
    assert result.stderr.strip() == f"fedlora: error: data file or folder " \
                                    f"'{tmp_path / 'x.csv'}' does not exist"


def test_a_simulation_starts_its_own_ray_unless_given_a_cluster():
    """A cluster that `ray start` left on the machine (or its stale address file) must not
    capture a plain simulation; --ray-address joins one, bringing its own resources."""
    from common.config import FedLoraConfig
    from simulations.runner import backend_config

    own = backend_config(FedLoraConfig())["init_args"]
    assert own["address"] == "local" and own["num_cpus"] >= 1
    joined = backend_config(FedLoraConfig(client_num_cpus=2), "10.0.0.5:6379")
    assert joined["init_args"]["address"] == "10.0.0.5:6379"
    assert "num_cpus" not in joined["init_args"]
    assert joined["client_resources"]["num_cpus"] == 2
