"""`fedlora inspect --data PATH`: the data checks a site runs before training, on a file.

Prints each check's count, its share of the rows, the policy the config sets for it and what
that policy would do; the label histogram; and how many tokens the rows take against
max-length. Exits 0 when training would go ahead, 1 when a check with policy refuse (or no row
left) would stop it.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from common.config import FedLoraConfig, build_config

if TYPE_CHECKING:  # common.data_checks imports torch: not at `fedlora`'s start-up
    from common.data_checks import DataReport

TOP_LABELS = 20  # labels listed by name; the rest are summed on one line


def add_inspect_parser(commands) -> argparse.ArgumentParser:
    parser = commands.add_parser(
        "inspect", help="check a data file before training on it: empty rows, duplicates, "
                        "truncation, labels")
    parser.add_argument("--data", required=True, metavar="PATH",
                        help="a CSV/JSON/JSONL/Parquet file, or a folder (its train file)")
    parser.add_argument("--run-config", action="append", default=[], metavar='"KEY=VALUE ..."',
                        help="config keys: the data's columns, task, max-length, the check-* "
                             "policies; may be repeated (a later value of a key wins)")
    parser.add_argument("--model", help="the model whose tokenizer counts tokens (default: the "
                                        "config's, 'default': MiniLM-L6)")
    parser.add_argument("--labels", help="the shared label set, as config labels: a comma list "
                                         "or a JSON file (default: every label in the data)")
    return parser


def inspect_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from common.data import DataSplits, load_site_rows, resolve_labels
    from common.data_checks import compute_report, judge, refusal
    from common.model import load_tokenizer

    cfg = _config(args)
    rows = load_site_rows(cfg, args.data, what="data")
    labels = (resolve_labels(cfg, DataSplits(train=rows, test=rows.select([])))
              if cfg.is_classification else None)
    report, _ = judge(compute_report(rows, load_tokenizer(cfg), cfg, labels), cfg)
    console = Console()
    console.print(f"[bold]{args.data}[/]: {report.rows} rows, task {cfg.task}, tokens counted "
                  f"with model {cfg.model}", soft_wrap=True, highlight=False)
    console.print(checks_table(report, cfg))
    if labels is not None:
        source = "config labels" if cfg.labels.strip() else "every label in the data"
        console.print(labels_table(report, labels, source))
    console.print(lengths_table(report, cfg))
    reason = refusal(report, cfg)
    if reason:
        print(f"fedlora: error: {reason}", file=sys.stderr)
        return 1
    console.print(f"{report.kept} of {report.rows} rows would train.", highlight=False)
    return 0


def _config(args: argparse.Namespace) -> FedLoraConfig:
    return build_config(overrides=args.run_config,
                        flags={"data": args.data, "model": args.model, "labels": args.labels})


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:.1f}%" if total else "-"


def checks_table(report: DataReport, cfg: FedLoraConfig):
    from rich.table import Table

    from common.data_checks import CHECKS, effect, policy

    table = Table(title="data checks")
    table.add_column("check")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    table.add_column("policy")
    table.add_column("effect")
    for check in CHECKS:
        count = report.count(check)
        table.add_row(f"{check.title}\n[dim]{check.key}[/]", str(count),
                      _share(count, report.rows), policy(cfg, check), effect(check, report, cfg))
    return table


def labels_table(report: DataReport, labels: list[str], source: str):
    from rich.table import Table

    table = Table(title="label histogram",
                  caption=f"{len(labels)} labels in the shared set ({source})")
    table.add_column("label")
    table.add_column("rows", justify="right")
    table.add_column("share", justify="right")
    ranked = sorted(zip(labels, report.label_counts), key=lambda pair: -pair[1])
    for label, count in ranked[:TOP_LABELS]:
        table.add_row(label, str(count), _share(count, report.rows))
    rest = ranked[TOP_LABELS:]
    if rest:
        count = sum(c for _, c in rest)
        table.add_row(f"({len(rest)} more labels)", str(count), _share(count, report.rows))
    empty = sum(1 for c in report.label_counts if c == 0)
    if empty:
        table.caption += f"; {empty} of them have no rows"
    return table


def lengths_table(report: DataReport, cfg: FedLoraConfig):
    from rich.table import Table

    table = Table(title=f"tokens per row (max-length {cfg.max_length})")
    for column in ("mean", "median", "95th percentile", "longest", "truncated"):
        table.add_column(column, justify="right")
    stats = report.lengths
    if stats is None:
        table.add_row("-", "-", "-", "-", "-")
    else:
        table.add_row(f"{stats.mean:.1f}", f"{stats.median:g}", f"{stats.p95:g}",
                      str(stats.longest),
                      f"{report.too_long} ({_share(report.too_long, report.rows)})")
    return table
