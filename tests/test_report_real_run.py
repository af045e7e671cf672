"""The report's plots from a real run: a short in-process federation writes metrics.jsonl, and
every value each plot draws is the one that file holds, round by round (the hand-made run
directories of tests/test_report.py cover the page itself)."""

from __future__ import annotations

import json
import statistics

import pytest

from common.config import FedLoraConfig
from server.app import run_federation
from server.report import build_plots, client_names, read_run
from simulations.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")


@pytest.fixture(scope="module")
def real_run(banking_subset, tmp_path_factory):
    from common.flower_compat import set_task_identity

    set_task_identity(run_id=1, task_id=1, node_id=0)
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=3,
                        num_rounds=2, local_steps=2, batch_size=8, max_train_examples=90,
                        max_eval_examples=40, min_available_clients=3, min_train_clients=2,
                        out_dir=str(tmp_path_factory.mktemp("report") / "run"))
    return run_federation(InProcessGrid(cfg, cfg.num_clients), cfg)


def _series(plots, plot_name: str) -> dict[str, dict[int, float]]:
    plot = next(p for p in plots if p.name == plot_name)
    return {s.label: dict(zip(s.rounds, s.values)) for panel in plot.panels for s in panel.series}


def test_every_plotted_value_is_the_one_metrics_jsonl_holds(real_run):
    records = [json.loads(line) for line in
               (real_run.path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    run = read_run(real_run.path)
    clients = client_names(run.rounds)
    plots = build_plots(run, clients)
    assert {p.name for p in plots} == {"server", "clients_train_loss", "clients_accuracy",
                                       "sites", "bytes"}

    server = _series(plots, "server")
    assert server["accuracy"] == {r["round"]: r["server"]["accuracy"] for r in records}
    assert server["loss"] == {r["round"]: r["server"]["loss"] for r in records}
    assert server["macro-F1"] == {r["round"]: r["server"]["macro-f1"] for r in records}

    by_client = {name: node for node, name in clients.items()}
    for plot, key, metric in (("clients_train_loss", "train-per-client", "train-loss"),
                              ("clients_accuracy", "evaluate-per-client", "eval-accuracy")):
        drawn = _series(plots, plot)
        expected = {}
        for record in records:
            for entry in record.get(key, []):
                expected.setdefault(clients[entry["node"]], {})[record["round"]] = entry[metric]
        assert drawn == expected and len(drawn) == 3, plot
        assert all(by_client[name] in clients for name in drawn)

    sites = _series(plots, "sites")
    for record in records[1:]:
        accuracies = [e["eval-accuracy"] for e in record["evaluate-per-client"]]
        assert sites["worst site"][record["round"]] == min(accuracies)
        assert sites["median site"][record["round"]] == statistics.median(accuracies)

    sent = _series(plots, "bytes")
    for record in records:
        # Drawn in MB (scaled by 1/1e6: equal to the bytes / 1e6 up to rounding)
        assert sent["down (server to clients)"][record["round"]] == pytest.approx(
            record["bytes-down"] / 1e6, rel=1e-12)
        assert sent["up (clients to server)"][record["round"]] == pytest.approx(
            record["bytes-up"] / 1e6, rel=1e-12)
    assert records[1]["bytes-up"] > 0 and records[0]["bytes-up"] > 0  # the head round's upload
