"""Terminal progress for a run: follows metrics.jsonl, so it works for any process writing it."""

from __future__ import annotations

import threading

from rich.console import Console, Group
from rich.live import Live
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from common.config import FedLoraConfig
from server.outputs import RunDirectory
from server.round_record import client_level_epsilon, round_epsilon, site_epsilon


def headline_metric(cfg: FedLoraConfig) -> str:
    return "accuracy" if cfg.is_classification else "perplexity"


def format_round(record: dict, cfg: FedLoraConfig) -> str:
    server = record.get("server", {})
    parts = [f"round {record['round']:>3}"]
    if cfg.is_classification:
        parts.append(f"accuracy {server.get('accuracy', float('nan')):.4f}")
        parts.append(f"macro-F1 {server.get('macro-f1', float('nan')):.4f}")
    else:
        parts.append(f"perplexity {server.get('perplexity', float('nan')):.3f}")
    parts.append(f"loss {server.get('loss', float('nan')):.4f}")
    if record.get("train"):
        parts.append(f"train-loss {record['train'].get('train-loss', float('nan')):.4f}")
    if (epsilon := site_epsilon(record)) is not None:
        parts.append(f"epsilon {epsilon:.2f}")
    if (epsilon := client_level_epsilon(record)) is not None:
        parts.append(f"client-level epsilon {epsilon:.2f}")
    if "evaluate-sites" in record:
        parts.append(f"worst site {record['evaluate-sites']['worst']:.4f}")
    dropped = record.get("dropped", [])
    if dropped:
        parts.append(f"left out {len(dropped)}: {dropped[0]['reason'][:80]}")
    parts.append(f"{record.get('seconds', 0):.1f}s")
    return " | ".join(parts)


class RoundProgress:
    """On a terminal: a live table of the rounds under a progress bar, redrawn as rounds land.
    Elsewhere (a log file, CI): one line per round, then the table at the end."""

    def __init__(self, run: RunDirectory, cfg: FedLoraConfig, console: Console) -> None:
        self.run, self.cfg, self.console = run, cfg, console
        self._stop = threading.Event()
        self._rounds: list[dict] = []
        self._bar = Progress(TextColumn("[progress.description]{task.description}"), BarColumn(),
                             TextColumn("{task.completed}/{task.total} rounds"),
                             TimeElapsedColumn(), console=console, transient=True)
        self._task = self._bar.add_task("federated rounds", total=cfg.num_rounds)
        self._live = (Live(self._view(), console=console, refresh_per_second=4)
                      if console.is_terminal else None)

    def __enter__(self) -> "RoundProgress":
        (self._live or self._bar).start()
        return self

    def __exit__(self, *exc) -> None:
        if self._live is not None:
            self._live.update(rounds_table(self._rounds, self.cfg, f"fedlora run {self.run.path}"),
                              refresh=True)  # the table stays on screen, without the bar
        (self._live or self._bar).stop()

    def follow(self) -> None:
        while not self._stop.wait(0.5):
            self._show_new_rounds()
        self._show_new_rounds()

    def stop(self) -> None:
        self._stop.set()

    def _view(self) -> Group:
        return Group(rounds_table(self._rounds, self.cfg, f"fedlora run {self.run.path}"),
                     self._bar)

    def _show_new_rounds(self) -> None:
        try:
            rounds = self.run.read_rounds()
        except (OSError, ValueError):  # the file is being replaced; read it next time
            return
        new = rounds[len(self._rounds):]
        if not new:
            return
        self._rounds = rounds
        self._bar.update(self._task, completed=rounds[-1]["round"])
        if self._live is not None:
            self._live.update(self._view())
            return
        for record in new:
            self._bar.console.print(format_round(record, self.cfg), highlight=False,
                                    soft_wrap=True)

    def print_summary(self, seconds: float) -> None:
        if self._live is None:  # on a terminal the live table is already there
            self.console.print(rounds_table(self.run.read_rounds(), self.cfg,
                                            f"fedlora run {self.run.path}"))
        self.console.print(f"final adapter: {self.run.final_adapter}  (total {seconds:.0f}s)",
                           highlight=False)


def rounds_table(rounds: list[dict], cfg: FedLoraConfig, title: str) -> Table:
    """Server metrics, client losses, traffic, privacy spent and time, one row per round."""
    metric = headline_metric(cfg)
    with_dp = any(round_epsilon(r) is not None for r in rounds)
    table = Table(title=title)
    columns = ["round", f"server {metric}", "server loss", "client train loss",
               "client eval loss", "worst site", "MB down", "MB up"] + (
               ["epsilon"] if with_dp else []) + ["left out", "seconds"]
    for column in columns:
        table.add_column(column, justify="right")
    for r in rounds:
        row = [str(r["round"]), f"{r['server'].get(metric, float('nan')):.4f}",
               f"{r['server'].get('loss', float('nan')):.4f}",
               _fmt(r.get("train", {}).get("train-loss")),
               _fmt(r.get("evaluate", {}).get("eval-loss")),
               _fmt(r.get("evaluate-sites", {}).get("worst")),
               f"{r.get('bytes-down', 0) / 1e6:.2f}", f"{r.get('bytes-up', 0) / 1e6:.2f}"]
        row += [_fmt(round_epsilon(r))] if with_dp else []
        row += [str(len(r.get("dropped", []))), f"{r.get('seconds', 0):.1f}"]
        table.add_row(*row)
    return table


def _fmt(value) -> str:
    return "-" if value is None else f"{value:.4f}"
