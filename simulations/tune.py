"""`fedlora tune`: hyperparameter search over simulation runs with Optuna.

Each trial is one `fedlora simulate` run (its own run directory under the tuning folder) with
sampled learning rate, LoRA rank and alpha, local steps, strategy and (for fedprox) proximal mu.
Its objective is the best server-side value of the selection metric over its rounds. A thread
follows the trial's metrics.jsonl and reports every round to Optuna; a trial the pruner gives up
on is stopped after that round through the run's STOP file. The study lives in SQLite, so the
same command continues it after an interruption. The best trial's config is written as a
run-config file that `fedlora simulate --run-config FILE` and `flwr run . --run-config FILE`
accept.
"""

from __future__ import annotations

import argparse
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from common.atomic import atomic_write_text
from common.config import FedLoraConfig, build_config
from common.config_reference import toml_value
from common.errors import FedLoraError
from common.strategy_registry import strategy_names, strategy_spec
from server.outputs import RunDirectory
from server.selection import HIGHER_IS_BETTER

TUNABLE_STRATEGIES = strategy_names(lambda spec: spec.tunable)


@dataclass(frozen=True)
class SearchSpace:
    learning_rate: tuple[float, float] = (1e-4, 3e-2)  # log-uniform
    lora_ranks: tuple[int, ...] = (4, 8, 16)
    alpha_over_rank: tuple[float, ...] = (1.0, 2.0)  # lora-alpha = this x rank
    local_steps: tuple[int, int] = (2, 20)
    strategies: tuple[str, ...] = ("fedavg", "fedprox", "ffa")
    proximal_mu: tuple[float, float] = (1e-3, 1.0)  # log-uniform, a proximal term's only


def sample_overrides(trial, space: SearchSpace) -> dict[str, object]:
    """One trial's run-config keys."""
    rank = trial.suggest_categorical("lora-r", list(space.lora_ranks))
    overrides = {
        "learning-rate": trial.suggest_float("learning-rate", *space.learning_rate, log=True),
        "lora-r": rank,
        "lora-alpha": float(rank * trial.suggest_categorical("alpha-over-rank",
                                                            list(space.alpha_over_rank))),
        "local-steps": trial.suggest_int("local-steps", *space.local_steps),
        "strategy": trial.suggest_categorical("strategy", list(space.strategies)),
    }
    if strategy_spec(str(overrides["strategy"])).proximal_term:
        overrides["proximal-mu"] = trial.suggest_float("proximal-mu", *space.proximal_mu,
                                                       log=True)
    return overrides


class RoundReporter:
    """Follows a trial's metrics.jsonl from a thread: each new round's value goes to Optuna,
    and when the pruner says so, the run is asked to stop after that round."""

    def __init__(self, trial, run: RunDirectory, key: str) -> None:
        self.trial, self.run, self.key = trial, run, key
        self.pruned_at: int | None = None
        self._done = threading.Event()
        self._reported = 0
        self._thread = threading.Thread(target=self._follow, daemon=True)

    def __enter__(self) -> "RoundReporter":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()
        self._report_new_rounds()

    def _follow(self) -> None:
        while not self._done.wait(0.5):
            self._report_new_rounds()

    def _report_new_rounds(self) -> None:
        try:
            rounds = self.run.read_rounds()
        except (OSError, ValueError):  # being replaced: next time
            return
        for record in rounds[self._reported:]:
            value = record.get("server", {}).get(self.key)
            if record["round"] > 0 and value is not None:
                self.trial.report(value, step=record["round"])
                if self.pruned_at is None and self.trial.should_prune():
                    self.pruned_at = record["round"]
                    self.run.stop_file.touch()
        self._reported = max(self._reported, len(rounds))


def run_trial(trial, base: FedLoraConfig, space: SearchSpace, out: Path,
              simulate: Callable[[FedLoraConfig], None]) -> float:
    import optuna

    cfg = build_config(base.to_run_config(), sample_overrides(trial, space),
                       {"out-dir": str(out / f"trial-{trial.number:03d}"), "resume": False})
    trial.set_user_attr("run-dir", cfg.out_dir)
    run = RunDirectory(cfg.out_dir)
    with RoundReporter(trial, run, cfg.selection_key) as reporter:
        try:
            simulate(cfg)
        except Exception as err:  # the trial failed; the study goes on
            raise FedLoraError(f"trial {trial.number} failed: {err}") from err
    if reporter.pruned_at is not None:
        raise optuna.TrialPruned(f"pruned after round {reporter.pruned_at}")
    # The run's own best round, chosen by the rule that also picked its best_adapter/.
    value = run.read_summary().get("best", {}).get(cfg.selection_key)
    if value is None:
        raise FedLoraError(f"trial {trial.number}: the run recorded no {cfg.selection_key}")
    return value


def open_study(out: Path, name: str, key: str, pruner_warmup: int):
    """The study in OUT/study.db; trials a killed process left running are marked failed."""
    import optuna

    out.mkdir(parents=True, exist_ok=True)
    study = optuna.create_study(
        study_name=name, storage=f"sqlite:///{out / 'study.db'}", load_if_exists=True,
        direction="maximize" if HIGHER_IS_BETTER[key] else "minimize",
        sampler=optuna.samplers.TPESampler(seed=0),
        pruner=optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=pruner_warmup))
    for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
        study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    return study


def tune(base: FedLoraConfig, out: Path, trials: int, space: SearchSpace,
         simulate: Callable[[FedLoraConfig], None], study_name: str = "fedlora",
         pruner_warmup: int = 1, on_trial: Callable[[object], None] | None = None):
    """Run trials until `trials` have finished (complete, pruned or failed) in the study."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = open_study(out, study_name, base.selection_key, pruner_warmup)
    finished = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.PRUNED,
                optuna.trial.TrialState.FAIL)
    while len(study.get_trials(deepcopy=False, states=finished)) < trials:
        study.optimize(lambda t: run_trial(t, base, space, out, simulate), n_trials=1,
                       catch=(FedLoraError,))
        if on_trial is not None:
            on_trial(study.trials[-1])
    write_results(study, base, out)
    return study


def write_results(study, base: FedLoraConfig, out: Path) -> None:
    """OUT/summary.md (every trial) and OUT/best.toml (the best trial's run config)."""
    import optuna

    rows = ["| trial | state | value | rounds | learning-rate | lora-r | lora-alpha | "
            "local-steps | strategy | proximal-mu |", "|" + "---|" * 10]
    for t in study.trials:
        p = t.params
        rank = p.get("lora-r")
        alpha = rank * p["alpha-over-rank"] if rank and "alpha-over-rank" in p else None
        value = "" if t.value is None else f"{t.value:.4f}"
        mu = f"{p['proximal-mu']:.3g}" if "proximal-mu" in p else ""
        rows.append(f"| {t.number} | {t.state.name.lower()} | {value} | "
                    f"{max(t.intermediate_values, default=0)} | "
                    f"{p.get('learning-rate', float('nan')):.2e} | {rank} | {alpha} | "
                    f"{p.get('local-steps')} | {p.get('strategy')} | {mu} |")
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    text = [f"# fedlora tune: {base.selection_key}, {len(study.trials)} trials", "", *rows, ""]
    if complete:
        best = study.best_trial
        text.append(f"Best: trial {best.number}, {base.selection_key} {best.value:.4f} "
                    f"({best.user_attrs.get('run-dir')}); its config: best.toml")
        atomic_write_text(out / "best.toml", best_config_toml(best, base))
    atomic_write_text(out / "summary.md", "\n".join(text) + "\n")


def best_config_toml(trial, base: FedLoraConfig) -> str:
    """The tuned keys over the base config, as flat TOML (`key = value`): the format of
    `flwr run --run-config FILE` and `fedlora simulate --run-config FILE`."""
    import tomllib

    values = {k: v for k, v in base.to_run_config().items()
              if k not in ("out-dir", "resume")}
    p = trial.params
    values.update({"learning-rate": p["learning-rate"], "lora-r": p["lora-r"],
                   "lora-alpha": float(p["lora-r"] * p["alpha-over-rank"]),
                   "local-steps": p["local-steps"], "strategy": p["strategy"]})
    if "proximal-mu" in p:
        values["proximal-mu"] = p["proximal-mu"]
    lines = [f"# fedlora tune: trial {trial.number}, {base.selection_key} {trial.value:.4f}"]
    for key, value in values.items():
        lines.append(f"{key} = {toml_value(value)}")
    text = "\n".join(lines) + "\n"
    tomllib.loads(text)  # never write a file flwr would refuse
    return text


def add_tune_parser(commands) -> argparse.ArgumentParser:
    tune_cmd = commands.add_parser(
        "tune", help="hyperparameter search over simulation runs (Optuna, resumable)")
    tune_cmd.add_argument("--data", help="data file, folder or hub data set")
    tune_cmd.add_argument("--out", required=True,
                          help="tuning folder: study.db, one run directory per trial, "
                               "summary.md, best.toml (run the same command to continue)")
    tune_cmd.add_argument("--trials", type=int, default=20, help="trials to finish in all")
    tune_cmd.add_argument("--num-clients", type=int, help="simulated sites per trial")
    tune_cmd.add_argument("--rounds", type=int, help="rounds per trial")
    tune_cmd.add_argument("--partition", choices=["iid", "dirichlet", "quantity"])
    tune_cmd.add_argument("--alpha", type=float)
    tune_cmd.add_argument("--strategies", nargs="+", choices=list(TUNABLE_STRATEGIES),
                          default=list(SearchSpace().strategies),
                          help="strategies to choose from")
    tune_cmd.add_argument("--ranks", type=int, nargs="+", default=list(SearchSpace().lora_ranks),
                          help="LoRA ranks to choose from")
    tune_cmd.add_argument("--local-steps", type=int, nargs=2, metavar=("MIN", "MAX"),
                          default=list(SearchSpace().local_steps),
                          help="range of local steps a round")
    tune_cmd.add_argument("--prune-after", type=int, default=1, metavar="ROUNDS",
                          help="rounds every trial runs before it may be pruned")
    tune_cmd.add_argument("--study-name", default="fedlora")
    tune_cmd.add_argument("--run-config", action="append", default=[],
                          metavar='"KEY=VALUE ..."', help="fixed config keys for every trial")
    return tune_cmd


def check_space(args: argparse.Namespace) -> SearchSpace:
    if args.trials <= 0:
        raise FedLoraError(f"tune: --trials must be positive, got {args.trials}")
    if args.prune_after < 1:
        raise FedLoraError(f"tune: --prune-after must be at least 1, got {args.prune_after}")
    if any(r <= 0 for r in args.ranks):
        raise FedLoraError("tune: --ranks must be positive integers")
    low, high = args.local_steps
    if not 0 < low <= high:
        raise FedLoraError(f"tune: --local-steps needs 0 < MIN <= MAX, got {low} {high}")
    return SearchSpace(lora_ranks=tuple(args.ranks), strategies=tuple(args.strategies),
                       local_steps=(low, high))
