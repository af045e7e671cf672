"""Every command shown in the README and the guides is run here, so none of them rots.

- `fedlora ...` commands run as written, in document order, in a scratch folder of their own
  per document (so `runs/b77` made by one command is there for the next). Paths to BANKING77
  point at a 10-intent slice, and every `fedlora simulate` (and `tune`, with one trial) gets
  `--num-clients 2 --rounds 1` and small sizes appended (later options win), so that the
  federation runs in seconds; it runs in
  this process through the same ClientApp and ServerApp, without Ray (tests/test_simulation.py
  runs the Ray path), except the scaling guide's commands, which run on a real Ray head.
- `make run` runs the Makefile's own command the same way; `make test` is what CI runs.
- Flower's own commands (`flwr`, `flower-superlink`, `flower-supernode`), `fedlora gateway`,
  `fedlora site`, `fedlora supernode` and `fedlora site-status` (servers, or clients of one)
  are run by tests/test_deployment.py and tests/test_simulation.py with local addresses: here every
  option a document shows must be one those tests pass, and every run-config key must exist.
- docs/benchmarks.md records how its figures were made (minutes to hours each): its commands
  must name an existing script and options that script defines; they are not run here.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from common.config import FedLoraConfig, parse_overrides
from simulations import cli
from tests.conftest import REPO, free_port, simulate_without_ray

pytestmark = pytest.mark.usefixtures("task_identity")

BIN = Path(sys.executable).parent
GUIDES = ["README.md", "docs/config.md", "docs/deployment.md", "docs/faq.md", "docs/privacy.md",
          "docs/scaling.md", "docs/strategies.md"]
SHRINK = ["--num-clients", "2", "--rounds", "1", "--run-config",
          "max-train-examples=60 max-eval-examples=30 local-steps=1 batch-size=8"]
FLOWER_TESTS = ["tests/test_deployment.py", "tests/test_simulation.py"]


def documented_commands(doc: str) -> list[list[str]]:
    """The commands of a document's ```bash blocks, continuations joined, comments dropped."""
    text = (REPO / doc).read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


def _program(words: list[str]) -> str:
    return Path(words[0]).name


@pytest.fixture
def scratch(banking_subset, tmp_path, monkeypatch):
    """A folder to run a document's commands in, with its data stand-ins."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("FLWR_HOME", str(tmp_path / "flwr_home"))
    pd.DataFrame({"text": [f"query {i}" for i in range(40)],
                  "label": ["a", "b", "c", "d"] * 10}).to_csv(tmp_path / "data.csv", index=False)
    return tmp_path


def _with_stand_ins(words: list[str], data: Path) -> list[str]:
    real = {"../shared/data/banking77": str(data), "/shared/banking77": str(data),
            "../shared/data/banking77/test.csv": str(data / "test.csv")}
    words = [real.get(w, w) for w in words]
    if "..." in words:  # "fedlora simulate ... --run-config KEYS": any data set will do
        i = words.index("...")
        words[i:i + 1] = ["--data", str(data), "--run-config", "label-column=category"]
    if "--data" in words and words[words.index("--data") + 1] == "data.csv":
        words += ["--run-config", "label-column=label"]
    return words


def run_fedlora(words: list[str], data: Path, monkeypatch) -> None:
    """One documented fedlora command, as a user would type it (see the module docstring)."""
    argv = _with_stand_ins(words, data)[1:]
    if argv[0] == "simulate":
        resume = "--resume" in argv
        argv += SHRINK if not resume else SHRINK[:2] + ["--rounds", "2"] + SHRINK[4:]
    elif argv[0] == "tune":  # one short trial
        argv += SHRINK + ["--trials", "1", "--local-steps", "1", "2"]
    elif argv[0] == "dashboard":  # serves until stopped: here, until it has answered once
        argv += ["--port", "0"]
        monkeypatch.setattr("server.dashboard.Dashboard.serve", _serve_one_request)
    simulate_without_ray(monkeypatch)
    code = cli.main(argv)
    assert code == 0, f"fedlora {shlex.join(argv)} exited {code}"


def _serve_one_request(dashboard) -> None:
    dashboard.start()
    try:
        with urllib.request.urlopen(f"{dashboard.url}api/state", timeout=30) as reply:
            runs = json.load(reply)["runs"]
        assert [run["status"] for run in runs] == ["completed"] * len(dashboard.paths)
    finally:
        dashboard.stop()


def _flower_options_tested() -> str:
    return "\n".join((REPO / path).read_text() for path in FLOWER_TESTS)


def check_flower_command(words: list[str]) -> None:
    tested = _flower_options_tested()
    program = _program(words)
    assert f'"{program}"' in tested, f"no test runs {program}"
    for word in words[1:3]:
        if not word.startswith("-") and re.fullmatch(r"[a-z]+", word):
            assert f'"{word}"' in tested, f"no test runs {program} {word}"
    for option in (w.split("=")[0] for w in words if w.startswith("--")):
        assert f'"{option}"' in tested, f"{program} {option}: no test passes this option"
    if "--run-config" in words:
        keys = parse_overrides(words[words.index("--run-config") + 1].replace("...", ""))
        unknown = set(keys) - set(FedLoraConfig().to_run_config())
        assert not unknown, f"unknown config keys {unknown}"


@pytest.mark.parametrize("doc", [d for d in GUIDES if d != "docs/scaling.md"])
def test_every_command_of_the_guide_runs(doc, scratch, banking_subset, monkeypatch):
    commands = documented_commands(doc)
    for words in commands:
        program = _program(words)
        # These serve until stopped, or ask what serves: tests/test_deployment.py runs them.
        if program == "fedlora" and words[1] in ("gateway", "site", "site-status", "supernode"):
            check_flower_command(words)
        elif program == "fedlora":
            run_fedlora(words, banking_subset, monkeypatch)
        elif program == "make":
            run_make_target(words[1], banking_subset, monkeypatch)
        elif program in ("flwr", "flower-superlink", "flower-supernode"):
            check_flower_command(words)
        else:
            pytest.fail(f"{doc}: no way to run {shlex.join(words)}; teach tests/test_docs.py")
    if doc == "README.md":  # what its commands left behind is what they promise
        assert (scratch / "runs/hospitals/report.html").is_file()
        assert (scratch / "models/intents-merged/config.json").is_file()
        assert (scratch / "models/b77-adapter/adapter_config.json").is_file()
        assert (scratch / "runs/tuned/best_adapter").is_dir()


def run_make_target(target: str, data: Path, monkeypatch) -> None:
    if target == "test":  # the suite this test belongs to; CI runs it
        assert "make test" in (REPO / ".ci/run").read_text()
        return
    assert target == "run", f"make {target} is not a Makefile target the docs should show"
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)
    line = recipe.group(1).replace("\\\n", " ").replace("\t", " ")
    line = line.replace("$(BIN)/fedlora", "fedlora").replace("$(DATA)", str(data))
    run_fedlora(shlex.split(line.replace("$(OUT)", "runs/quickstart")), data, monkeypatch)


def test_the_scaling_guide_runs_on_a_separately_started_ray_head(scratch, banking_subset):
    """docs/scaling.md as written, with this machine's address and a free port for HEAD:6379."""
    port = str(free_port())
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               RAY_DEDUP_LOGS="0", PYTHONPATH=str(REPO))
    commands = documented_commands("docs/scaling.md")
    assert [_program(w) for w in commands] == ["ray", "fedlora", "ray"]
    try:
        for words in commands:
            words = [w.replace("HEAD:6379", f"127.0.0.1:{port}").replace("6379", port)
                     for w in _with_stand_ins(words, banking_subset)]
            if words[1] == "simulate":  # and 2 actors of 8 declared CPUs, not 4 of 4
                words += SHRINK + ["--client-cpus", "8", "--out", str(scratch / "run"),
                                   "--run-config", "label-column=category"]
            result = subprocess.run([str(BIN / _program(words)), *words[1:]], cwd=scratch,
                                    env=env, capture_output=True, text=True, timeout=300)
            assert result.returncode == 0, shlex.join(words) + "\n" + result.stdout[-2000:] + \
                result.stderr[-2000:]
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True,
                       timeout=120)
    rounds = (scratch / "run/metrics.jsonl").read_text().splitlines()
    assert len(rounds) == 2  # round 0 and the one round trained through the head


def test_benchmark_commands_name_existing_scripts_and_options():
    for words in documented_commands("docs/benchmarks.md"):
        script = REPO / words[1]
        assert _program(words) == "python" and script.is_file(), shlex.join(words)
        source = script.read_text() + (REPO / "bench/strategies.py").read_text()
        for option in (w for w in words[2:] if w.startswith("--")):
            assert f'"{option}"' in source, f"{words[1]} defines no {option}"
