"""Data checks: counts by hand on a file with known defects, what each policy does, the counts a
site reports and the totals the server keeps, a site refused for its data, `fedlora inspect`."""

from __future__ import annotations

import argparse
import json

import pandas as pd
import pytest
from flwr.app import ConfigRecord, Context, Message, MetricRecord, RecordDict

import client.app as client_app
from common.config import FedLoraConfig
from common.data import (
    load_server_splits,
    load_site_rows,
    load_splits,
    resolve_labels,
    tokenize,
)
from common.data_checks import (
    check_pool,
    check_site_rows,
    compute_report,
    report_metrics,
    total_site_reports,
)
from common.errors import FedLoraError
from common.model import build_lora_model, load_tokenizer
from common.partitioning import partition_indices
from common.records import adapter_to_record
from server.app import run_federation
from server.contract import TrainUpdate, parse_data_report, parse_metrics
from simulations.inprocess import InProcessGrid
from simulations.inspect import add_inspect_parser, inspect_command

pytestmark = pytest.mark.usefixtures("task_identity")

LABELS = ["atm", "card", "fee"]
LONG = "why was i charged such a high fee on my card last month"  # 15 tokens with [CLS], [SEP]
# (text, label); None = a missing cell. Defects, by hand: rows 7-9 empty or missing (2 texts,
# 1 label), rows 2, 3 and 5 repeat an earlier row (row 6 has row 4's text, not its label),
# row 10 is the only one over max-length 8, row 11's label is outside LABELS.
DEFECTIVE = [
    ("lost card", "card"),  # 1
    ("lost card", "card"),  # 2 duplicate
    ("lost card", "card"),  # 3 duplicate
    ("atm fee", "fee"),  # 4
    ("atm fee", "fee"),  # 5 duplicate
    ("atm fee", "atm"),  # 6 same text, other label: not a duplicate
    (None, "card"),  # 7 missing text
    ("   ", "fee"),  # 8 blank text
    ("where is the atm", None),  # 9 missing label
    (LONG, "fee"),  # 10 too long
    ("card arrived", "kard"),  # 11 unknown label
    ("new card", "card"),  # 12
]
HISTOGRAM = (1, 5, 4)  # atm: 6; card: 1, 2, 3, 7, 12; fee: 4, 5, 8, 10
CHECK_KEYS = ("check-empty", "check-duplicates", "check-too-long", "check-unknown-labels")


def _write(rows, path):
    pd.DataFrame(rows, columns=["text", "category"]).to_csv(path, index=False)
    return path


def _cfg(**overrides) -> FedLoraConfig:
    return FedLoraConfig(**{"label_column": "category", "max_length": 8, **overrides})


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(FedLoraConfig())


@pytest.fixture
def defective(tmp_path, tokenizer):
    """The defective file's rows as a site reads them, and their report."""
    rows = load_site_rows(_cfg(), str(_write(DEFECTIVE, tmp_path / "site.csv")))
    return rows, compute_report(rows, tokenizer, _cfg(), LABELS)


def _texts(rows) -> list[tuple[str, str]]:
    return list(zip(rows["text"], rows["target"]))


def test_counts_equal_a_hand_count_of_a_file_with_known_defects(defective):
    rows, report = defective
    assert len(rows) == 12  # nothing dropped on the way in
    assert (report.rows, report.empty, report.duplicates, report.too_long,
            report.unknown_labels) == (12, 3, 3, 1, 1)
    assert report.label_counts == HISTOGRAM and report.unknown_example == "kard"
    assert report.lengths.longest == 15 and report.lengths.max_length == 8


def test_token_counts_are_the_lengths_tokenize_builds_before_truncating(tmp_path, tokenizer):
    rows = load_site_rows(_cfg(), str(_write(DEFECTIVE[:6] + DEFECTIVE[9:10], tmp_path / "a.csv")))
    untruncated = _cfg(max_length=512)
    built = [len(e["input_ids"]) for e in tokenize(rows, tokenizer, untruncated, LABELS)]
    assert compute_report(rows, tokenizer, _cfg(max_length=max(built) - 1), LABELS).too_long == 1
    assert compute_report(rows, tokenizer, _cfg(max_length=max(built)), LABELS).too_long == 0
    # causal-lm: templated prompt + response + eos, as the training example is built.
    pairs = pd.DataFrame({"prompt": ["Query: lost card", "Query: " + LONG],
                          "response": [" card", " fee"]})
    pairs.to_json(tmp_path / "sft.jsonl", orient="records", lines=True)
    causal = FedLoraConfig(task="causal-lm", max_length=512)
    sft = load_site_rows(causal, str(tmp_path / "sft.jsonl"))
    lengths = [len(e["input_ids"]) for e in tokenize(sft, tokenizer, causal)]
    report = compute_report(sft, tokenizer, causal.replace(max_length=min(lengths)), None)
    assert report.too_long == 1 and report.lengths.longest == max(lengths)
    assert report.label_counts == () and report.unknown_labels == 0


def test_drop_removes_exactly_the_offending_rows(defective):
    rows, report = defective
    cfg = _cfg(**{k.replace("-", "_"): "drop" for k in CHECK_KEYS})
    kept, judged = check_site_rows(rows, load_tokenizer(cfg), cfg, LABELS)
    assert _texts(kept) == [("lost card", "card"), ("atm fee", "fee"), ("atm fee", "atm"),
                            ("new card", "card")]
    assert judged.dropped == {"empty": 3, "duplicates": 3, "too-long": 1, "unknown-labels": 1}
    assert judged.total_dropped == 8 and judged.kept == 4
    assert judged.label_counts == HISTOGRAM  # the report describes the rows as read


def test_the_kept_rows_are_trainable_under_the_default_policies(defective, tokenizer):
    rows, _ = defective
    kept, judged = check_site_rows(rows, tokenizer, _cfg(check_unknown_labels="drop"), LABELS)
    assert judged.dropped == {"empty": 3, "duplicates": 0, "too-long": 0, "unknown-labels": 1}
    # tokenize refuses missing and unknown labels; none is left.
    assert len(tokenize(kept, tokenizer, _cfg(), LABELS)) == len(kept) == 8


def test_warn_keeps_every_row_a_classifier_can_train_on(defective, tokenizer):
    rows, _ = defective
    cfg = _cfg(**{k.replace("-", "_"): "warn" for k in CHECK_KEYS})
    logged = []
    kept, judged = check_site_rows(rows, tokenizer, cfg, LABELS,
                                   log=lambda level, line: logged.append(line))
    # A missing label or one outside the set has no class: left out even under warn.
    assert _texts(kept) == [r for i, r in enumerate(_texts(rows)) if i not in (8, 10)]
    assert ("", "card") in _texts(kept) and ("   ", "fee") in _texts(kept)
    assert judged.dropped == {"empty": 1, "duplicates": 0, "too-long": 0, "unknown-labels": 1}
    assert len(logged) == 4 and all(line.startswith("data check: ") for line in logged)
    assert ("data check: 3 of 12 rows repeat an earlier row's text and label "
            "(check-duplicates=warn: kept)") \
        in logged
    # causal-lm has no classes: warn keeps even an empty response (the same rows, read as
    # prompt and response).
    causal = FedLoraConfig(task="causal-lm", check_empty="warn")
    kept, judged = check_site_rows(rows, tokenizer, causal, None)
    assert len(kept) == 12 and judged.total_dropped == 0


@pytest.mark.parametrize("key, count, words", [
    ("check-empty", 3, "have an empty or missing text or label"),
    ("check-duplicates", 3, "repeat an earlier row's text and label"),
    ("check-too-long", 1, "are longer than max-length (8 tokens) and would be truncated"),
    ("check-unknown-labels", 1, "have a label outside the shared label set, e.g. 'kard'"),
])
def test_refuse_raises_one_line_naming_the_check_count_and_key(defective, tokenizer, key, count,
                                                               words):
    rows, _ = defective
    policies = {k.replace("-", "_"): "refuse" if k == key else "warn" for k in CHECK_KEYS}
    with pytest.raises(FedLoraError) as err:
        check_site_rows(rows, tokenizer, _cfg(**policies), LABELS)
    assert str(err.value) == (f"data check: {count} of 12 rows {words} ({key}=refuse; set it "
                              f"to drop or warn)")


def test_no_row_left_is_refused_and_bad_policies_are_named(tmp_path, tokenizer):
    rows = load_site_rows(_cfg(), str(_write([("", "card"), ("x", None)], tmp_path / "e.csv")))
    with pytest.raises(FedLoraError, match="none of the 2 rows is left to train on"):
        check_site_rows(rows, tokenizer, _cfg(), LABELS)
    with pytest.raises(FedLoraError, match="check-too-long must be one of warn, drop, refuse"):
        FedLoraConfig.from_run_config({"check-too-long": "skip"})


def test_loading_keeps_blank_rows_for_the_checks_and_evaluation_leaves_them_out(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(DEFECTIVE, folder / "train.csv")
    _write([("lost card", "card"), ("", "fee"), ("atm fee", None)], folder / "test.csv")
    splits = load_splits(_cfg(data=str(folder)))
    assert len(splits.train) == 12 and _texts(splits.test) == [("lost card", "card")]
    assert resolve_labels(_cfg(), splits) == ["atm", "card", "fee", "kard"]  # never ""
    # The coordinator's eval-data, sampled or not: only rows it can score.
    for most in (0, 6):
        test = load_server_splits(_cfg(eval_data=str(folder / "train.csv"),
                                       max_eval_examples=most)).test
        assert len(test) == (9 if most == 0 else 6)
        assert not [r for r in _texts(test) if not r[0].strip() or not r[1]]


def test_the_preflight_refuses_a_bad_pool_before_anything_starts(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    _write(DEFECTIVE, folder / "train.csv")
    _write([("lost card", "card")], folder / "test.csv")
    cfg = _cfg(data=str(folder), labels=",".join(LABELS))
    with pytest.raises(FedLoraError, match=r"1 of 12 rows have a label outside .*check-unknown"):
        check_pool(cfg, load_splits(cfg), LABELS)
    report = check_pool(cfg.replace(check_unknown_labels="drop"), load_splits(cfg), LABELS)
    assert (report.empty, report.duplicates, report.total_dropped) == (3, 3, 4)


# -- on the wire: what a site sends, what the server accepts and sums --------------------------

def _reply_metrics(**changes) -> dict:
    metrics = {"num-examples": 5, "train-loss": 0.5, "data-rows": 12, "data-empty": 3,
               "data-duplicates": 3, "data-too-long": 1, "data-unknown-labels": 1,
               "data-dropped": 4, "data-label-counts": [1, 5, 4]}
    metrics.update(changes)
    return {k: v for k, v in metrics.items() if v is not None}


def _message(metrics: dict) -> Message:
    return Message(RecordDict({"metrics": MetricRecord(metrics)}), dst_node_id=1,
                   message_type="train")


def test_a_sites_counts_travel_as_data_metrics(defective):
    _, report = defective
    assert report_metrics(report) == {**{k: v for k, v in _reply_metrics().items()
                                         if k.startswith("data-")}, "data-dropped": 0}
    MetricRecord(report_metrics(report))  # plain ints and a list of ints: a valid record


@pytest.mark.parametrize("change, fragment", [
    ({"data-empty": -1}, "'data-empty' must be an integer from 0"),
    ({"data-too-long": 1.0}, "'data-too-long' must be an integer"),
    ({"data-duplicates": None}, "'data-duplicates' must be an integer"),
    ({"data-dropped": 13}, "'data-dropped' (13) exceeds 'data-rows' (12)"),
    ({"data-label-counts": [1, 5]}, "has 2 counts; the shared label set has 3 labels"),
    ({"data-label-counts": [1, 5, 9]}, "'data-label-counts' adds up to 15, more than"),
    ({"data-label-counts": [1, -5, 4]}, "'data-label-counts' must be an integer from 0"),
])
def test_the_server_refuses_implausible_counts(change, fragment):
    with pytest.raises(FedLoraError) as err:
        parse_data_report(_reply_metrics(**change), num_labels=3)
    assert fragment in str(err.value)


def test_counts_are_parsed_apart_from_the_metrics_that_are_averaged():
    msg = _message(_reply_metrics())
    assert parse_metrics(msg) == {"num-examples": 5.0, "train-loss": 0.5}
    assert parse_data_report(dict(msg.content["metrics"]), num_labels=3) == {
        "rows": 12, "empty": 3, "duplicates": 3, "too-long": 1, "unknown-labels": 1,
        "dropped": 4, "label-counts": [1, 5, 4]}
    assert parse_data_report({"num-examples": 5}) is None  # a site that sent none
    # SecAgg+ hands the server legacy metrics: counts as floats, no histogram.
    legacy = {k: float(v) for k, v in _reply_metrics().items() if not isinstance(v, list)}
    update = TrainUpdate(node_id=7, state={}, num_examples=5, metrics=legacy)
    assert update.metrics == {"num-examples": 5.0, "train-loss": 0.5}
    assert update.data_report["rows"] == 12 and "label-counts" not in update.data_report


def test_totals_over_sites_are_sums():
    reports = [parse_data_report(_reply_metrics(), 3),
               parse_data_report(_reply_metrics(**{"data-rows": 20, "data-empty": 0,
                                                    "data-label-counts": [7, 0, 2]}), 3)]
    assert total_site_reports(reports, LABELS) == {
        "sites": 2, "rows": 32, "empty": 3, "duplicates": 6, "too-long": 2,
        "unknown-labels": 2, "dropped": 8, "label-counts": {"atm": 8, "card": 5, "fee": 6}}
    assert total_site_reports([]) == {"sites": 0, "rows": 0, "empty": 0, "duplicates": 0,
                                      "too-long": 0, "unknown-labels": 0, "dropped": 0}


# -- in a federation ---------------------------------------------------------------------------

def _pool(tmp_path, train_rows) -> FedLoraConfig:
    folder = tmp_path / "pool"
    folder.mkdir(exist_ok=True)
    _write(train_rows, folder / "train.csv")
    _write([(f"test query {i} about my {LABELS[i % 3]}", LABELS[i % 3]) for i in range(12)],
           folder / "test.csv")
    return FedLoraConfig(data=str(folder), label_column="category", labels=",".join(LABELS),
                         num_clients=2, num_rounds=2, local_steps=1, lora_r=2, max_length=12,
                         out_dir=str(tmp_path / "run"))


def _clean_rows(n: int) -> list[tuple[str, str]]:
    return [(f"query {i} about my {LABELS[i % 3]}", LABELS[i % 3]) for i in range(n)]


def _site_reports(cfg: FedLoraConfig) -> list[dict]:
    """Each site's report, computed here from its partition as the site computes it."""
    splits = load_splits(cfg)
    tokenizer = load_tokenizer(cfg)
    reports = []
    for rows in partition_indices(splits.train, cfg):
        site = splits.train.select(rows)
        _, report = check_site_rows(site, tokenizer, cfg, LABELS)
        reports.append({k.removeprefix("data-"): v for k, v in report_metrics(report).items()})
    return reports


def test_sites_report_counts_with_every_reply_and_the_server_keeps_their_sum(tmp_path,
                                                                             monkeypatch):
    cfg = _pool(tmp_path, _clean_rows(30) + DEFECTIVE).replace(check_unknown_labels="drop")
    expected = total_site_reports(_site_reports(cfg), LABELS)
    # What the whole pool holds, wherever the partition puts it.
    assert (expected["sites"], expected["rows"], expected["empty"], expected["too-long"],
            expected["unknown-labels"]) == (2, 42, 3, 1, 1)
    assert list(expected["label-counts"].values()) == [h + 10 for h in HISTOGRAM]

    # A site's reply carries its counts, in every round.
    monkeypatch.setattr(client_app, "_CACHE", None)
    global_state = build_lora_model(cfg, LABELS).trainable_state()
    site_zero = _site_reports(cfg)[0]
    for server_round in (1, 2):
        reply = client_app.train(*_train_message(cfg, global_state, server_round))
        sent = dict(reply.content["metrics"])
        assert {k: sent[f"data-{k}"] for k in site_zero} == site_zero

    run = run_federation(InProcessGrid(cfg, 2), cfg)
    rounds, summary = run.read_rounds(), run.read_summary()
    assert [r.get("data-checks") for r in rounds] == [None, expected, expected]
    assert summary["data-checks"] == expected
    for record in rounds[1:]:  # counts are not training metrics
        assert not [k for k in record["train"] if k.startswith("data-")]
        assert not [k for c in record["train-per-client"] for k in c if k.startswith("data-")]


def _train_message(cfg: FedLoraConfig, state, server_round: int) -> tuple[Message, Context]:
    context = Context(run_id=1, node_id=10, node_config={"partition-id": 0, "num-partitions": 2},
                      state=RecordDict(), run_config=cfg.to_run_config())
    msg = Message(RecordDict({"arrays": adapter_to_record(state),
                              "config": ConfigRecord({"labels": json.dumps(LABELS),
                                                      "server-round": server_round})}),
                  dst_node_id=10, message_type="train")
    return msg, context


def test_a_site_whose_data_is_refused_is_left_out_with_the_reason(tmp_path):
    rows = _clean_rows(24)
    cfg = _pool(tmp_path, rows).replace(check_duplicates="refuse", num_rounds=1,
                                        min_train_clients=1, min_evaluate_clients=1)
    site_zero, site_one = partition_indices(load_splits(cfg).train, cfg)
    rows[site_zero[1]] = rows[site_zero[0]]  # a duplicate on site 0 only (iid ignores content)
    _write(rows, tmp_path / "pool" / "train.csv")
    assert partition_indices(load_splits(cfg).train, cfg) == [site_zero, site_one]

    run = run_federation(InProcessGrid(cfg, 2, first_node_id=1000), cfg)
    record = run.read_rounds()[1]
    assert [d["node"] for d in record["dropped"]] == [1000]
    assert ("data check: 1 of 12 rows repeat an earlier row's text and label "
            "(check-duplicates=refuse; set it to drop or warn)") in record["dropped"][0]["reason"]
    assert record["data-checks"]["sites"] == 1 and record["data-checks"]["rows"] == len(site_one)
    assert run.read_summary()["status"] == "completed"


# -- fedlora inspect ---------------------------------------------------------------------------

@pytest.fixture
def wide(monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # rich's tables, without wrapped cells


def _inspect(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="fedlora")
    add_inspect_parser(parser.add_subparsers(dest="command"))
    return inspect_command(parser.parse_args(["inspect", *argv]))


def test_inspect_prints_the_checks_and_exits_0_when_training_would_go_ahead(tmp_path, capsys, wide):
    path = _write(DEFECTIVE, tmp_path / "site.csv")
    code = _inspect("--data", str(path), "--run-config", "label-column=category",
                    "--run-config", "max-length=8")
    out = capsys.readouterr().out
    assert code == 0
    rows = {line.split("│")[1].strip(): [c.strip() for c in line.split("│")[2:-1]]
            for line in out.splitlines() if line.count("│") == 6}
    assert rows["empty or missing text or label"] == ["3", "25.0%", "drop", "3 left out"]
    assert rows["exact duplicates"] == ["3", "25.0%", "warn", "kept"]
    assert rows["longer than max-length"] == ["1", "8.3%", "warn", "kept"]
    # Without --labels the set is every label in the data: nothing unknown.
    assert rows["labels outside the shared set"] == ["0", "0.0%", "refuse", "-"]
    assert "label histogram" in out and "tokens per row (max-length 8)" in out
    assert "9 of 12 rows would train." in out


def test_inspect_exits_1_on_a_refusal_and_raises_for_a_missing_file(tmp_path, capsys, wide):
    path = _write(DEFECTIVE, tmp_path / "site.csv")
    code = _inspect("--data", str(path), "--run-config", "label-column=category",
                    "--labels", ",".join(LABELS))
    captured = capsys.readouterr()
    assert code == 1
    assert captured.err.strip() == (
        "fedlora: error: data check: 1 of 12 rows have a label outside the shared label set, "
        "e.g. 'kard' (check-unknown-labels=refuse; set it to drop or warn)")
    assert "would train" not in captured.out
    with pytest.raises(FedLoraError, match="data '/nowhere.csv' does not exist"):
        _inspect("--data", "/nowhere.csv")


def test_inspect_lists_the_top_labels_and_sums_the_rest(tmp_path, capsys, wide):
    labels = [f"intent_{i:02d}" for i in range(25)]
    rows = [(f"query {i} {j}", label) for i, label in enumerate(labels) for j in range(i + 1)]
    path = _write(rows, tmp_path / "many.csv")
    assert _inspect("--data", str(path), "--run-config", "label-column=category") == 0
    out = capsys.readouterr().out
    assert "intent_24" in out and "intent_05" in out and "intent_04" not in out
    rest = next(line for line in out.splitlines() if "(5 more labels)" in line)
    assert rest.split("│")[2].strip() == str(1 + 2 + 3 + 4 + 5)

