"""The training pool a simulation's driver hands to its client processes."""

import json
import os
import subprocess
import sys
import tempfile
import threading
import time

import pandas as pd
import pytest

from client import app as client_app
from common.config import FedLoraConfig
from common.data import columns, load_splits, resolve_labels, tokenize
from common.data_checks import check_site_rows, report_metrics
from common.errors import FedLoraError
from common.model import load_tokenizer
from simulations import runner, startup
from simulations.cli import preflight
from simulations.shared_pool import (
    SHARED_POOL_ENV,
    PoolWithdrawn,
    Rows,
    SharedPool,
    read_shared_pool,
    write_shared_pool,
)
from tests.conftest import assert_python_runs


@pytest.fixture
def small_csv(tmp_path):
    path = tmp_path / "d.csv"
    texts = [f"query number {i}" for i in range(40)]
    texts[5], texts[9] = "", texts[8]  # something for the checks to find: a blank, a repeat
    pd.DataFrame({"text": texts, "label": ["a", "b", "c", "d"] * 10}).to_csv(path, index=False)
    return path


def _site_context(partition: int, partitions: int):
    return type("Context", (), {"node_config": {"partition-id": partition,
                                                "num-partitions": partitions},
                                "node_id": partition})()


def test_rows_are_checked_and_tokenised_as_the_dataset_they_came_from(small_csv):
    cfg = FedLoraConfig(data=str(small_csv), check_empty="drop", check_duplicates="drop")
    splits = load_splits(cfg)
    labels, tokenizer = resolve_labels(cfg, splits), load_tokenizer(cfg)
    texts, targets = columns(splits.train, "text", "target")
    pick = [texts.index(""), texts.index("query number 8"), 0, 3, 11, 2]
    kept, report = check_site_rows(splits.train.select(pick), tokenizer, cfg, labels)
    kept_rows, rows_report = check_site_rows(Rows(texts, targets).select(pick), tokenizer, cfg,
                                             labels)
    assert report.total_dropped >= 1 and len(kept) < len(pick)
    assert report_metrics(rows_report) == report_metrics(report)
    assert tokenize(kept_rows, tokenizer, cfg, labels) == tokenize(kept, tokenizer, cfg, labels)


def test_a_pool_is_handed_over_whole_or_not_at_all(tmp_path):
    path = tmp_path / "pool.json"
    assert read_shared_pool(path, timeout=0.1) is None  # none yet: the process reads the data
    # A process on another machine of a cluster: no such folder there, nothing to wait for.
    assert read_shared_pool(tmp_path / "elsewhere" / "pool.json", timeout=30) is None
    write_shared_pool(path, None)  # the driver hands none over
    assert read_shared_pool(path, timeout=0) is None
    write_shared_pool(path, SharedPool(Rows(["a b", "c"], ["x", "y"]), ["x", "y"], [[1], [0]]))
    pool = read_shared_pool(path, timeout=0)
    assert (pool.rows["text"], pool.rows["target"], pool.labels, pool.partitions) == \
        (["a b", "c"], ["x", "y"], ["x", "y"], [[1], [0]])
    with pytest.raises(ValueError, match="2 texts but 1 targets"):
        Rows(["a", "b"], ["x"])


def test_a_process_stops_waiting_for_a_pool_when_the_run_ends(tmp_path):
    folder = tmp_path / "pool"
    folder.mkdir()
    ended = threading.Timer(0.2, folder.rmdir)  # the driver stops Ray and removes the folder
    ended.start()
    started = time.monotonic()
    with pytest.raises(PoolWithdrawn, match="run ended"):
        read_shared_pool(folder / "pool.json", timeout=30)
    assert time.monotonic() - started < 10


def test_the_checks_pool_is_handed_over_once_the_checks_pass(monkeypatch, pool_folders_in):
    files = []
    monkeypatch.setattr(runner, "start_ray",
                        lambda cfg, address=None, pool=None: files.append(pool))
    pool = SharedPool(Rows(["a", "b"], ["x", "y"]), ["x", "y"], [[0], [1]])
    runner.start_ray_during(lambda: pool, FedLoraConfig())
    assert read_shared_pool(files[0], timeout=0).partitions == [[0], [1]]
    runner.stop_ray()  # the run's end takes the folder with it
    assert not files[0].parent.exists()

    def bad_rows():
        raise FedLoraError("3 rows are empty")

    with pytest.raises(FedLoraError, match="3 rows are empty"):
        runner.start_ray_during(bad_rows, FedLoraConfig())
    assert not files[1].parent.exists()  # nothing to wait for: Ray was stopped
    runner.start_ray_during(lambda: pool, FedLoraConfig(), "10.0.0.9:6379")
    assert read_shared_pool(files[2], timeout=0).partitions == [[0], [1]]  # a cluster's too
    runner.stop_ray()


def test_a_pool_that_cannot_be_handed_over_leaves_the_data_to_the_processes(
        monkeypatch, pool_folders_in, caplog):
    files, calls = [], []
    monkeypatch.setattr(runner, "start_ray",
                        lambda cfg, address=None, pool=None: files.append(pool))
    monkeypatch.setattr(runner, "stop_ray", lambda: calls.append("stop"))
    pool = SharedPool(Rows(["a"], ["x"]), ["x"], [[0]])

    def disk_full(path, pool):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "write_shared_pool", disk_full)
    runner.start_ray_during(lambda: pool, FedLoraConfig())  # the run goes on, Ray stays up
    assert calls == [] and not files[0].parent.exists()  # waiting processes stop waiting
    assert "No space left on device" in caplog.text

    def no_folder(prefix):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkdtemp", no_folder)
    runner.start_ray_during(lambda: pool, FedLoraConfig())
    assert files[1] is None and "Permission denied" in caplog.text  # nobody waits for a pool


def test_a_process_handed_the_pool_warms_up_from_it_and_trains_on_the_same_examples(
        small_csv, tmp_path, monkeypatch):
    cfg = FedLoraConfig(data=str(small_csv), num_clients=4)
    pool = preflight(cfg)
    path = tmp_path / "pool.json"
    write_shared_pool(path, pool)

    def reading_the_data(cfg):
        raise AssertionError("the data was read again")

    real_load_splits = client_app.load_splits
    monkeypatch.setattr(client_app, "load_splits", reading_the_data)
    monkeypatch.setenv(SHARED_POOL_ENV, str(path))
    monkeypatch.setattr(client_app, "_CACHE", None)
    startup.warm_up_site_process(cfg.to_run_config())
    warmed = client_app._CACHE
    assert warmed is not None and warmed.partitions == pool.partitions and warmed.models
    handed = client_app._site_state(cfg, None, _site_context(1, 4), pool.labels)

    monkeypatch.setattr(client_app, "load_splits", real_load_splits)
    monkeypatch.delenv(SHARED_POOL_ENV)
    monkeypatch.setattr(client_app, "_CACHE", None)
    startup.warm_up_site_process(cfg.to_run_config())
    read = client_app._site_state(cfg, None, _site_context(1, 4), pool.labels)
    assert handed.train_examples and handed.train_examples == read.train_examples
    assert handed.val_examples == read.val_examples
    assert report_metrics(handed.data_report) == report_metrics(read.data_report)


def test_a_process_handed_the_pool_imports_neither_datasets_nor_pandas(small_csv, tmp_path):
    cfg = FedLoraConfig(data=str(small_csv), num_clients=2)
    path = tmp_path / "pool.json"
    write_shared_pool(path, preflight(cfg))
    small_csv.unlink()  # reading the data would fail the warm-up
    assert_python_runs(
        "import json, os, sys\n"
        f"os.environ[{SHARED_POOL_ENV!r}] = {str(path)!r}\n"
        "from client import app\n"
        "from simulations.startup import warm_up_site_process\n"
        f"warm_up_site_process(json.loads({json.dumps(json.dumps(cfg.to_run_config()))}))\n"
        "assert app._CACHE is not None and app._CACHE.models, 'the warm-up was skipped'\n"
        "heavy = [name for name in ('datasets', 'pandas') if name in sys.modules]\n"
        "assert not heavy, heavy\n")


def test_a_killed_runs_pool_folder_is_removed_by_the_next_run(tmp_path):
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    abandoned = tmp_path / f"fedlora-pool-{gone.stdout.strip()}-x1"
    running = tmp_path / f"fedlora-pool-{os.getpid()}-x2"
    for folder in (abandoned, running, tmp_path / "fedlora-pool-notapid-x3"):
        folder.mkdir()
        (folder / "pool.json").write_text("null")
    runner.remove_abandoned_pools(tmp_path)
    assert not abandoned.exists()
    assert running.exists() and (tmp_path / "fedlora-pool-notapid-x3").exists()
