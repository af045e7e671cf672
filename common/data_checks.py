"""Checks of the rows a site trains on, before it trains; what happens to the rows each finds.

Four checks count rows: an empty or missing text or label, an exact repeat of an earlier row's
text and label, more tokens than max-length (they would be truncated), and a label outside the
shared label set; a label histogram comes with them. Each check has a policy, config key
check-NAME: warn (log the count), drop (leave those rows out) or refuse (stop, with one line
naming the check, the count and the key). A site reports the counts to the server as data-*
metrics, never rows or texts; `fedlora inspect` prints them for a file; `fedlora simulate`
runs them on the whole training pool before anything starts.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from logging import INFO, WARNING
from typing import Iterable, Mapping, Sequence

import numpy as np

from common.config import FedLoraConfig
from common.data import DataSplits, columns, is_blank
from common.errors import FedLoraError

METRIC_PREFIX = "data-"  # a site's counts travel as data-NAME in its train replies
SITE_COUNTS = ("rows", "empty", "duplicates", "too-long", "unknown-labels", "dropped")
LABEL_COUNTS = "label-counts"  # the histogram: one count per label of the shared set


@dataclass(frozen=True)
class Check:
    name: str  # config key check-NAME, metric data-NAME, DataReport field NAME (with _)
    title: str  # for tables
    finding: str  # what the rows it counts "have" or "are", for messages

    @property
    def key(self) -> str:
        return f"check-{self.name}"

    @property
    def attribute(self) -> str:
        return self.name.replace("-", "_")


CHECKS = (
    Check("empty", "empty or missing text or label", "have an empty or missing {fields}"),
    Check("duplicates", "exact duplicates", "repeat an earlier row's text and label"),
    Check("too-long", "longer than max-length",
          "are longer than max-length ({max_length} tokens) and would be truncated"),
    Check("unknown-labels", "labels outside the shared set",
          "have a label outside the shared label set"),
)


@dataclass(frozen=True)
class LengthStats:
    """Tokens per row (the whole example: special tokens; for causal-lm prompt + response)."""

    max_length: int
    mean: float
    median: float
    p95: float
    longest: int


@dataclass(frozen=True)
class RowFlags:
    """Per row, which checks it fails. A row with an empty text or label fails only "empty":
    the other checks need both."""

    empty: np.ndarray
    duplicates: np.ndarray
    too_long: np.ndarray
    unknown_labels: np.ndarray
    missing_label: np.ndarray  # empty rows whose label (or response) is the empty part


@dataclass(frozen=True)
class DataReport:
    """Counts of the rows as read (before any policy drops rows), and what the policies did."""

    rows: int
    empty: int
    duplicates: int
    too_long: int
    unknown_labels: int
    label_counts: tuple[int, ...]  # per label of the shared set; () without one (causal-lm)
    lengths: LengthStats | None  # None when no row has a text and a label
    unknown_example: str = ""  # one label outside the set, for the message
    dropped: Mapping[str, int] = field(default_factory=dict)  # check name -> rows left out
    flags: RowFlags | None = field(default=None, repr=False, compare=False)

    def count(self, check: Check) -> int:
        return getattr(self, check.attribute)

    @property
    def total_dropped(self) -> int:
        return sum(self.dropped.values())

    @property
    def kept(self) -> int:
        return self.rows - self.total_dropped


# -- finding ---------------------------------------------------------------------------------

def compute_report(rows, tokenizer, cfg: FedLoraConfig, labels: Sequence[str] | None
                   ) -> DataReport:
    """The report of `rows` (a Dataset with "text" and "target", as common/data.py reads them)
    before anything is dropped. `labels`: the shared label set (classification); None skips the
    unknown-label check and the histogram."""
    texts, targets = columns(rows, "text", "target")
    missing_label = np.array([is_blank(y) for y in targets], dtype=bool)
    empty = missing_label | np.array([is_blank(t) for t in texts], dtype=bool)
    lengths = token_counts(texts, targets, tokenizer, cfg, usable=~empty)
    known = set(labels or ())
    check_labels = cfg.is_classification and labels is not None
    unknown = np.array([check_labels and y not in known for y in targets], dtype=bool) & ~empty
    flags = RowFlags(empty=empty, duplicates=repeats(texts, targets) & ~empty,
                     too_long=(lengths > cfg.max_length) & ~empty, unknown_labels=unknown,
                     missing_label=missing_label)
    unknown_labels = sorted({y for y, bad in zip(targets, unknown) if bad})
    return DataReport(
        rows=len(texts), empty=int(empty.sum()), duplicates=int(flags.duplicates.sum()),
        too_long=int(flags.too_long.sum()), unknown_labels=int(unknown.sum()),
        label_counts=label_histogram(targets, labels) if check_labels else (),
        lengths=length_stats(lengths[~empty], cfg.max_length),
        unknown_example=unknown_labels[0] if unknown_labels else "", flags=flags)


def repeats(texts: Sequence[str], targets: Sequence[str]) -> np.ndarray:
    """True for every row whose text and target both equal an earlier row's."""
    seen: set[tuple[str, str]] = set()
    flags = np.zeros(len(texts), dtype=bool)
    for i, pair in enumerate(zip(texts, targets)):
        flags[i] = pair in seen
        seen.add(pair)
    return flags


def token_counts(texts: Sequence[str], targets: Sequence[str], tokenizer, cfg: FedLoraConfig,
                 usable: np.ndarray) -> np.ndarray:
    """Untruncated tokens per row as common/data.py's `tokenize` builds the example (0 for
    rows not `usable`): the text with special tokens, or for causal-lm the templated prompt
    with special tokens, the response and the eos token."""
    counts = np.zeros(len(texts), dtype=np.int64)
    index = np.flatnonzero(usable)
    if not len(index):
        return counts
    if cfg.is_classification:
        counts[index] = _lengths(tokenizer, [texts[i] for i in index], special=True)
        return counts
    prompts = [cfg.prompt_template.format(prompt=texts[i]) for i in index]
    eos = 1 if tokenizer.eos_token_id is not None else 0
    counts[index] = (_lengths(tokenizer, prompts, special=True)
                     + _lengths(tokenizer, [targets[i] for i in index], special=False) + eos)
    return counts


def _lengths(tokenizer, texts: list[str], special: bool) -> np.ndarray:
    # verbose=False: counting a long text is the point, not something to warn about
    encoded = tokenizer(texts, add_special_tokens=special, truncation=False, verbose=False)
    return np.array([len(ids) for ids in encoded["input_ids"]], dtype=np.int64)


def label_histogram(targets: Iterable[str], labels: Sequence[str]) -> tuple[int, ...]:
    """Rows per label of the shared set, in its order."""
    counts = Counter(targets)
    return tuple(counts[label] for label in labels)


def length_stats(lengths: np.ndarray, max_length: int) -> LengthStats | None:
    if not len(lengths):
        return None
    return LengthStats(max_length=max_length, mean=float(lengths.mean()),
                       median=float(np.median(lengths)),
                       p95=float(np.percentile(lengths, 95)), longest=int(lengths.max()))


# -- judging ---------------------------------------------------------------------------------

def policy(cfg: FedLoraConfig, check: Check) -> str:
    return getattr(cfg, f"check_{check.attribute}")


def untrainable(check: Check, cfg: FedLoraConfig, flags: RowFlags) -> np.ndarray:
    """The rows of `check` that no policy can keep: a classifier has no class for a missing
    label or one outside the shared set, so under warn they are still left out."""
    if cfg.is_classification and check.name == "empty":
        return flags.missing_label
    if cfg.is_classification and check.name == "unknown-labels":
        return flags.unknown_labels
    return np.zeros_like(flags.empty)


def finding(check: Check, report: DataReport, cfg: FedLoraConfig) -> str:
    """E.g. '12 of 300 rows have an empty or missing text or label'."""
    fields = "text or label" if cfg.is_classification else "prompt or response"
    text = f"{report.count(check)} of {report.rows} rows " + \
        check.finding.format(fields=fields, max_length=cfg.max_length)
    if check.name == "unknown-labels" and report.unknown_example:
        text += f", e.g. {report.unknown_example!r}"
    return text


def refusal(report: DataReport, cfg: FedLoraConfig) -> str | None:
    """The one-line reason training must not start, or None: the first check with policy
    refuse that found rows, or no row left to train on."""
    for check in CHECKS:
        if policy(cfg, check) == "refuse" and report.count(check):
            return (f"data check: {finding(check, report, cfg)} ({check.key}=refuse; set it "
                    f"to drop or warn)")
    if report.dropped and report.kept == 0:
        return (f"data check: none of the {report.rows} rows is left to train on (the data "
                f"checks leave out {report.total_dropped})")
    return None


def rows_to_drop(report: DataReport, cfg: FedLoraConfig) -> dict[str, np.ndarray]:
    """Per check, the rows it leaves out; a row that several checks drop counts for the first
    of them (CHECKS order), so the counts add up to the rows left out."""
    flags = report.flags
    taken = np.zeros(report.rows, dtype=bool)
    dropped = {}
    for check in CHECKS:
        found = getattr(flags, check.attribute)
        if policy(cfg, check) != "drop":
            found = found & untrainable(check, cfg, flags)
        dropped[check.name] = found & ~taken
        taken |= found
    return dropped


def judge(report: DataReport, cfg: FedLoraConfig) -> tuple[DataReport, np.ndarray]:
    """The report with the rows each policy leaves out, and which rows are kept; nothing is
    dropped or refused here."""
    dropped = rows_to_drop(report, cfg)
    kept = np.ones(report.rows, dtype=bool)
    for mask in dropped.values():
        kept &= ~mask
    judged = replace(report, dropped={name: int(mask.sum()) for name, mask in dropped.items()})
    return judged, kept


def effect(check: Check, report: DataReport, cfg: FedLoraConfig) -> str:
    """What the check's policy does to the rows it found (of a judged report), in words."""
    count, left_out = report.count(check), report.dropped.get(check.name, 0)
    rule = policy(cfg, check)
    if not count:
        return "-"
    if rule == "refuse":
        return "training refused"
    if rule == "drop":
        earlier = count - left_out  # rows an earlier check left out already
        return f"{count} left out" + (f" ({earlier} by an earlier check)" if earlier else "")
    if not left_out:
        return "kept"
    kept = f"{count - left_out} kept, " if left_out < count else ""
    return f"{kept}{left_out} left out anyway: no class to train them on"


def apply_policies(rows, report: DataReport, cfg: FedLoraConfig, log=None
                   ) -> tuple[object, DataReport]:
    """The rows to train on, and the report with the rows left out per check. Raises
    FedLoraError when a check with policy refuse found rows, or when no row is left.
    `log(level, message)` hears one line per check that found rows."""
    judged, kept = judge(report, cfg)
    reason = refusal(judged, cfg)
    if reason:
        raise FedLoraError(reason)
    if log is not None:
        for check in CHECKS:
            if judged.count(check):
                rule = policy(cfg, check)
                log(WARNING if rule == "warn" else INFO,
                    f"data check: {finding(check, judged, cfg)} ({check.key}={rule}: "
                    f"{effect(check, judged, cfg)})")
    return (rows if kept.all() else rows.select(np.flatnonzero(kept).tolist())), judged


def check_site_rows(rows, tokenizer, cfg: FedLoraConfig, labels: Sequence[str] | None, log=None
                    ) -> tuple[object, DataReport]:
    """A site's checks: the report of its rows, then the policies (see apply_policies)."""
    return apply_policies(rows, compute_report(rows, tokenizer, cfg, labels), cfg, log)


def check_pool(cfg: FedLoraConfig, splits: DataSplits, labels: Sequence[str] | None,
               log=None) -> DataReport:
    """`fedlora simulate`'s preflight: the checks on the whole training pool, so bad data is
    refused before any process starts (FedLoraError). The sites check their own shares again
    when they start: a duplicate whose copies land on two sites is one here only."""
    from common.model import load_tokenizer

    _, report = check_site_rows(splits.train, load_tokenizer(cfg), cfg, labels, log)
    return report


# -- reporting ---------------------------------------------------------------------------------

def report_metrics(report: DataReport) -> dict[str, int | list[int]]:
    """What a site tells the server: counts only, as data-* metrics of its train replies."""
    counts = {"rows": report.rows, "empty": report.empty, "duplicates": report.duplicates,
              "too-long": report.too_long, "unknown-labels": report.unknown_labels,
              "dropped": report.total_dropped}
    metrics: dict[str, int | list[int]] = {METRIC_PREFIX + name: int(counts[name])
                                           for name in SITE_COUNTS}
    if report.label_counts:
        metrics[METRIC_PREFIX + LABEL_COUNTS] = [int(c) for c in report.label_counts]
    return metrics


def total_site_reports(reports: Iterable[Mapping[str, int | list[int]]],
                       labels: Sequence[str] | None = None) -> dict:
    """The totals over sites of their reports (SITE_COUNTS, and LABEL_COUNTS where sent), with
    the histogram by label name when the label set is known."""
    reports = list(reports)
    totals: dict = {"sites": len(reports)}
    totals.update({name: sum(int(r[name]) for r in reports) for name in SITE_COUNTS})
    histograms = [r[LABEL_COUNTS] for r in reports if LABEL_COUNTS in r]
    if histograms:
        summed = [int(sum(column)) for column in zip(*histograms)]
        named = labels is not None and len(labels) == len(summed)
        totals[LABEL_COUNTS] = dict(zip(labels, summed)) if named else summed
    return totals
