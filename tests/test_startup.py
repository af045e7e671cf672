"""What shortens the way to the first training step, without changing what a run records:
round 0 scored while round 1 trains, client processes warmed before their first message, and
flwr-datasets' partitioners without its plotting imports."""

from __future__ import annotations

import gc
import json
import os
import random
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch

from client import app as client_app
from common import model as common_model
from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.gc_pause import garbage_collection_paused
from common.records import adapter_to_record
from server.checkpoint import load_run_state
from server.outputs import RunDirectory
from server.rounds import RoundRecorder
from simulations import runner, startup
from tests.conftest import REPO, assert_python_runs


class _Strategy:
    """What RoundRecorder reads of a strategy."""

    def __init__(self) -> None:
        self.round_stats: dict[int, dict] = {}
        self.rng = random.Random(7)
        self.moments = {"m": torch.zeros(3)}

    def base_offsets(self):
        return None

    def state_tensors(self):
        return {"opt": dict(self.moments)}


class _BlockingEvaluator:
    """Scores an adapter as its sum, once released: a slow evaluation made visible."""

    def __init__(self, fail: bool = False) -> None:
        self.release, self.started, self.fail = threading.Event(), threading.Event(), fail
        self.lora = type("Lora", (), {"set_base_offsets": lambda self, offsets: None})()

    def __call__(self, arrays):
        self.started.set()
        assert self.release.wait(30)
        if self.fail:
            raise RuntimeError("evaluation broke")
        total = sum(float(a.numpy().sum()) for a in arrays.values())
        return {"accuracy": total, "eval-seconds": 0.0}


@pytest.fixture
def run_dir(tmp_path):
    cfg = FedLoraConfig(out_dir=str(tmp_path / "run"))
    return RunDirectory.create(cfg, ["a", "b"])


def _arrays(value: float):
    return adapter_to_record({"w": torch.full((2,), value)}, "float32")


def test_round_zero_is_scored_while_round_one_runs_and_checkpointed_as_before_it(run_dir):
    strategy, evaluator = _Strategy(), _BlockingEvaluator()
    recorder = RoundRecorder(run_dir, evaluator, strategy, FedLoraConfig())
    rng_before_round_one = strategy.rng.getstate()

    assert recorder(0, _arrays(1.0)) is None  # returns at once: round 1 may start
    assert evaluator.started.wait(30)
    strategy.rng.sample(range(100), 5)  # round 1 samples its sites meanwhile ...
    strategy.moments["m"] += 5.0  # ... and moves the strategy's state in place
    assert run_dir.read_rounds() == []  # round 0 is still being scored
    evaluator.release.set()
    recorder.wait()

    rounds = run_dir.read_rounds()
    assert [r["round"] for r in rounds] == [0] and rounds[0]["server"]["accuracy"] == 2.0
    ckpt = load_run_state(run_dir.checkpoint_dir)
    assert ckpt.round == 0 and ckpt.sampling_rng == rng_before_round_one
    assert torch.equal(ckpt.parts["opt"]["m"], torch.zeros(3))
    assert torch.equal(ckpt.adapter["w"], torch.ones(2))

    metrics = recorder(1, _arrays(3.0))  # later rounds are scored in line
    assert metrics["accuracy"] == 6.0
    assert [r["round"] for r in run_dir.read_rounds()] == [0, 1]
    assert load_run_state(run_dir.checkpoint_dir).round == 1


def test_round_one_waits_for_round_zero_so_the_lines_stay_in_order(run_dir):
    evaluator = _BlockingEvaluator()
    recorder = RoundRecorder(run_dir, evaluator, _Strategy(), FedLoraConfig())
    recorder(0, _arrays(1.0))
    threading.Timer(0.3, evaluator.release.set).start()
    recorder(1, _arrays(2.0))
    assert [r["round"] for r in run_dir.read_rounds()] == [0, 1]


def test_a_failed_round_zero_evaluation_is_raised_in_the_run(run_dir):
    evaluator = _BlockingEvaluator(fail=True)
    evaluator.release.set()
    recorder = RoundRecorder(run_dir, evaluator, _Strategy(), FedLoraConfig())
    recorder(0, _arrays(1.0))
    with pytest.raises(RuntimeError, match="evaluation broke"):
        recorder(1, _arrays(2.0))
    recorder(0, _arrays(1.0))
    recorder.wait(reraise=False)  # a run already failing keeps its own error
    assert run_dir.read_rounds() == []


def test_a_rounds_score_taken_while_the_sites_evaluate_is_the_one_recorded(run_dir):
    strategy, evaluator = _Strategy(), _BlockingEvaluator()
    recorder = RoundRecorder(run_dir, evaluator, strategy, FedLoraConfig())
    arrays = _arrays(3.0)
    recorder.score_ahead(1, arrays)
    assert evaluator.started.wait(30)  # scoring while the loop's exchange runs
    assert run_dir.read_rounds() == []
    evaluator.started.clear()
    evaluator.release.set()
    assert recorder(1, arrays)["accuracy"] == 6.0
    assert not evaluator.started.is_set()  # not scored a second time
    assert [r["round"] for r in run_dir.read_rounds()] == [1]
    # A score for another adapter than the one recorded is not used.
    recorder.score_ahead(2, _arrays(1.0))
    assert recorder(2, _arrays(5.0))["accuracy"] == 10.0
    # What the scoring raised is raised in the run.
    evaluator.fail = True
    recorder.score_ahead(3, arrays)
    with pytest.raises(RuntimeError, match="evaluation broke"):
        recorder(3, arrays)


def test_the_server_scores_each_round_before_the_sites_have_evaluated_it(tmp_path, task_identity,
                                                                         monkeypatch):
    """A grid that lets the evaluate exchange go only once the server's evaluation of that
    round has begun (waiting up to 60 s for it): scored after the exchange, it never has."""
    from flwr.app import MessageType

    from server.app import run_federation
    from server.evaluation import GlobalEvaluator
    from simulations.inprocess import InProcessGrid

    scorings = threading.Semaphore(0)  # one release each time the server begins to score
    score = GlobalEvaluator.__call__

    def scored(self, arrays):
        scorings.release()
        return score(self, arrays)

    monkeypatch.setattr(GlobalEvaluator, "__call__", scored)
    waited = []

    class EvaluateAfterScoring(InProcessGrid):
        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            if messages and messages[0].metadata.message_type == MessageType.EVALUATE:
                # Round r's own scoring must have begun (round 1's: round 0's too).
                needed = 1 if waited else 2
                waited.append(all(scorings.acquire(timeout=60) for _ in range(needed)))
            return super().send_and_receive(messages, timeout)

    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"query number {i}" for i in range(40)],
                  "label": ["a", "b", "c", "d"] * 10}).to_csv(path, index=False)
    cfg = FedLoraConfig(data=str(path), out_dir=str(tmp_path / "run"), num_clients=2,
                        num_rounds=2, local_steps=1, head_mode="train")
    run = run_federation(EvaluateAfterScoring(cfg, 2), cfg)
    assert waited == [True, True]
    assert [r["round"] for r in run.read_rounds()] == [0, 1, 2]
    assert all(0 <= r["server"]["accuracy"] <= 1 for r in run.read_rounds())


@pytest.fixture
def small_csv(tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"query number {i}" for i in range(40)],
                  "label": ["a", "b", "c", "d"] * 10}).to_csv(path, index=False)
    return path


def test_a_warmed_process_serves_its_first_message_from_the_cache(small_csv, monkeypatch):
    cfg = FedLoraConfig(data=str(small_csv), num_clients=4)
    monkeypatch.setattr(client_app, "_CACHE", None)
    client_app.warm_up(cfg)
    warmed = client_app._CACHE
    assert warmed is not None and warmed.partitions is not None
    assert sorted(i for part in warmed.partitions for i in part) == \
        list(range(len(warmed.pool)))
    model = warmed.models[cfg.global_lora_rank]

    context = type("Context", (), {"node_config": {"partition-id": 2, "num-partitions": 4},
                                   "node_id": 2})()
    # The labels the server sends: the same as the warm-up resolved, so nothing is rebuilt.
    runtime = client_app._site_state(cfg, None, context, ["a", "b", "c", "d"])
    assert client_app._CACHE is warmed and runtime.lora is model


def test_a_warm_up_that_fails_leaves_the_error_to_the_first_message(tmp_path, monkeypatch):
    monkeypatch.setattr(client_app, "_CACHE", None)
    cfg = FedLoraConfig(data=str(tmp_path / "missing.csv"))
    client_app.warm_up(cfg)  # no exception: the worker must still start
    assert client_app._CACHE is None
    context = type("Context", (), {"node_config": {"partition-id": 0}, "node_id": 1})()
    with pytest.raises(FedLoraError, match="missing.csv"):  # the first message says why
        client_app._site_state(cfg, None, context, ["a"])


def test_a_refused_site_is_checked_once_and_refused_on_every_message(small_csv, monkeypatch):
    cfg = FedLoraConfig(data=str(small_csv), num_clients=2, check_duplicates="refuse")
    monkeypatch.setattr(client_app, "_CACHE", None)
    checks = []
    real_check = client_app.check_site_rows

    def counting_check(*args, **kwargs):
        checks.append(1)
        return real_check(*args, **kwargs)

    monkeypatch.setattr(client_app, "check_site_rows", counting_check)
    duplicated = small_csv.parent / "dup.csv"
    pd.DataFrame({"text": ["same query"] * 10, "label": ["a"] * 10}).to_csv(duplicated,
                                                                           index=False)
    cfg = cfg.replace(data=str(duplicated))
    context = type("Context", (), {"node_config": {"partition-id": 0, "num-partitions": 2},
                                   "node_id": 1})()
    errors = []
    for _ in range(3):
        with pytest.raises(FedLoraError, match="check-duplicates=refuse") as raised:
            client_app._site_state(cfg, None, context, ["a"])
        errors.append(str(raised.value))
    assert len(checks) == 1 and len(set(errors)) == 1


def test_partitioners_load_without_the_plotting_stack_and_the_package_stays_whole():
    code = ("import sys\n"
            "from common.partitioning import flwr_partitioners\n"
            "assert flwr_partitioners().IidPartitioner\n"
            "assert 'seaborn' not in sys.modules and 'matplotlib' not in sys.modules\n"
            "import flwr_datasets\n"
            "assert flwr_datasets.FederatedDataset and flwr_datasets.partitioner.IidPartitioner\n")
    assert_python_runs(code)


def test_the_best_round_survives_a_checkpoint(run_dir):
    evaluator = _BlockingEvaluator()
    evaluator.release.set()
    recorder = RoundRecorder(run_dir, evaluator, _Strategy(), FedLoraConfig())
    recorder(0, _arrays(1.0))
    recorder(1, _arrays(4.0))  # accuracy 8: the best
    recorder(2, _arrays(2.0))
    best = load_run_state(run_dir.checkpoint_dir).best
    assert (best.round, best.value) == (1, 8.0)
    assert torch.equal(best.adapter["w"], torch.full((2,), 4.0))
    resumed = RoundRecorder(run_dir, evaluator, _Strategy(), FedLoraConfig(), best=best)
    resumed(3, _arrays(3.0))  # accuracy 6: round 1 stays the best
    assert load_run_state(run_dir.checkpoint_dir).best.round == 1


def test_a_rounds_seconds_start_after_the_previous_rounds_evaluation(run_dir):
    import time

    class SlowEvaluator(_BlockingEvaluator):
        def __call__(self, arrays):
            time.sleep(0.4)
            return super().__call__(arrays)

    evaluator = SlowEvaluator()
    evaluator.release.set()
    recorder = RoundRecorder(run_dir, evaluator, _Strategy(), FedLoraConfig())
    recorder(0, _arrays(1.0))
    recorder(1, _arrays(1.0))
    recorder(2, _arrays(1.0))  # nothing happened between the two but this one's evaluation
    seconds = [r["seconds"] for r in run_dir.read_rounds()]
    assert 0.4 <= seconds[2] < 0.8, seconds  # not 2 x 0.4: round 1's evaluation is not in it


def test_a_machine_leaves_one_core_to_the_server_while_client_processes_load():
    assert [startup.load_slots(cores) for cores in (1, 2, 4, 16)] == [1, 1, 3, 15]


def test_a_second_process_loads_only_when_the_first_frees_its_slot(tmp_path):
    order: list[str] = []
    first_holds = threading.Event()

    def first() -> None:
        with startup.load_slot(tmp_path, 1) as slot:
            order.append(f"first got {slot}")
            first_holds.set()
            time.sleep(0.5)
            order.append("first done")

    thread = threading.Thread(target=first)
    thread.start()
    assert first_holds.wait(10)
    with startup.load_slot(tmp_path, 1, wait=0.1) as slot:  # the only slot is taken
        assert slot is None
    with startup.load_slot(tmp_path, 1, wait=30) as slot:
        order.append(f"second got {slot}")
    thread.join()
    assert order == ["first got 0", "first done", "second got 0"]


def test_two_slots_let_two_load_at_once(tmp_path):
    with startup.load_slot(tmp_path, 2) as one, startup.load_slot(tmp_path, 2, wait=1) as two:
        assert {one, two} == {0, 1}


def test_a_process_that_dies_while_loading_frees_its_slot(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from pathlib import Path; "
         "from simulations.startup import load_slot\n"
         "with load_slot(Path(sys.argv[1]), 1):\n"
         "    print('held', flush=True); time.sleep(120)", str(tmp_path)],
        cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with startup.load_slot(tmp_path, 1, wait=0.2) as slot:
            assert slot is None  # held by the live process
        holder.kill()
        holder.wait(10)
        with startup.load_slot(tmp_path, 1, wait=10) as slot:
            assert slot == 0
    finally:
        holder.kill()


def test_a_slot_folder_that_cannot_be_made_means_loading_at_once(tmp_path, caplog):
    blocked = tmp_path / "a-file"
    blocked.write_text("not a folder")
    with startup.load_slot(blocked, 1) as slot:
        assert slot is None  # no slot, no exception: the process still loads
    assert "no load slots" in caplog.text


def test_the_worker_hook_loads_the_run_inside_a_slot(small_csv, tmp_path, monkeypatch):
    cfg = FedLoraConfig(data=str(small_csv), num_clients=4)
    seen: list = []

    def warm_up(cfg):  # is the slot held while it loads, and the collector paused?
        with startup.load_slot(tmp_path / "slots", 1, wait=0) as slot:
            seen.append((cfg, slot, gc.isenabled()))

    monkeypatch.setattr(client_app, "warm_up", warm_up)
    monkeypatch.setattr(startup, "slots_folder", lambda: tmp_path / "slots")
    monkeypatch.setenv(startup.RUN_CONFIG_ENV, json.dumps(cfg.to_run_config()))
    monkeypatch.setattr(startup, "load_slots", lambda: 1)
    try:
        startup.warm_up_worker()
        assert seen == [(cfg, None, False)]  # the hook's slot was taken
        assert gc.isenabled()
        # Frozen: the process serves one run, so the collector need never walk it again.
        assert gc.get_freeze_count() > 0
        assert not any(item is seen[0] for item in gc.get_objects())
    finally:
        gc.unfreeze()


def test_the_input_checks_that_fail_while_ray_starts_stop_it_quietly(monkeypatch, capfd,
                                                                      pool_folders_in):
    calls: list[str] = []

    def stop_ray_as_ray_does_while_actors_register() -> None:
        os.write(2, b"core_worker.cc:2217: Failed to register actor.\n")
        calls.append("stop")

    monkeypatch.setattr(runner, "start_ray",
                        lambda cfg, address=None, pool=None: calls.append("start"))
    monkeypatch.setattr(runner, "stop_ray", stop_ray_as_ray_does_while_actors_register)

    def bad_rows() -> None:
        time.sleep(0.2)
        raise FedLoraError("3 rows are empty")

    with pytest.raises(FedLoraError, match="3 rows are empty"):
        runner.start_ray_during(bad_rows, FedLoraConfig())
    assert calls == ["start", "stop"]
    assert "Failed to register actor" not in capfd.readouterr().err
    os.write(2, b"stderr works again\n")
    assert capfd.readouterr().err == "stderr works again\n"
    calls.clear()
    runner.start_ray_during(lambda: None, FedLoraConfig())
    assert calls == ["start"]  # good input: Ray stays up for the run


@pytest.mark.skipif(sys.platform != "linux", reason="a thread's own niceness is Linux's")
def test_the_input_checks_run_at_low_priority_while_ray_starts(monkeypatch, pool_folders_in):
    def niceness() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    seen: dict[str, int] = {}
    monkeypatch.setattr(runner, "start_ray",
                        lambda cfg, address=None, pool=None: seen.setdefault("ray", niceness()))
    before = niceness()
    runner.start_ray_during(lambda: seen.setdefault("checks", niceness()) and None,
                            FedLoraConfig())
    assert seen == {"checks": max(before, runner.CHECKS_NICENESS), "ray": before}
    assert niceness() == before  # only the checks' thread, which has ended


def test_the_servers_threads_wait_briefly_from_before_ray_and_torch_start(monkeypatch,
                                                                          pool_folders_in):
    """libgomp reads GOMP_SPINCOUNT once, when torch loads it: it must be set before the
    checks (which import torch in this process) and Ray (whose processes inherit it) start."""
    seen = {}
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    monkeypatch.setattr(runner, "start_ray", lambda cfg, address=None, pool=None:
                        seen.setdefault("ray", os.environ.get("GOMP_SPINCOUNT")))
    runner.start_ray_during(lambda: seen.setdefault("checks", os.environ.get("GOMP_SPINCOUNT"))
                            and None, FedLoraConfig())
    spin = str(runner.SHARED_CORES_SPIN_COUNT)
    assert seen == {"checks": spin, "ray": spin}
    monkeypatch.setenv("GOMP_SPINCOUNT", "50")  # the user's own setting stays
    runner.start_ray_during(lambda: None, FedLoraConfig())
    assert os.environ["GOMP_SPINCOUNT"] == "50"


def test_ray_starts_and_the_checks_run_with_the_collector_paused(monkeypatch, pool_folders_in):
    seen: dict[str, bool] = {}
    monkeypatch.setattr(runner, "start_ray", lambda cfg, address=None, pool=None:
                        seen.setdefault("ray", gc.isenabled()))

    def checks() -> None:
        seen["checks"] = gc.isenabled()

    runner.start_ray_during(checks, FedLoraConfig())
    assert seen == {"checks": False, "ray": False}
    assert gc.isenabled()  # on again for the run


def test_the_collector_stays_paused_until_the_last_of_several_blocks_ends():
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen: dict[str, bool] = {}

    def first() -> None:
        with garbage_collection_paused():
            first_in.set()
            seen["second entered"] = second_in.wait(5)
        first_out.set()

    def second() -> None:
        seen["first entered"] = first_in.wait(5)
        with garbage_collection_paused():
            second_in.set()
            seen["first ended"] = first_out.wait(5)
            seen["after the first ended"] = gc.isenabled()
            with garbage_collection_paused():  # nested in the same thread
                pass
            seen["after a nested block"] = gc.isenabled()

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert seen == {"first entered": True, "second entered": True, "first ended": True,
                    "after the first ended": False, "after a nested block": False}
    assert gc.isenabled()
    with pytest.raises(ValueError), garbage_collection_paused():
        raise ValueError("a failed load")
    assert gc.isenabled()
    gc.disable()  # off before: stays off
    try:
        with garbage_collection_paused():
            pass
        assert not gc.isenabled()
    finally:
        gc.enable()


def test_what_a_pause_leaves_goes_to_the_oldest_generation_and_stays_collectable():
    import weakref

    class Loaded:
        pass

    freed = []
    gc.collect()  # young counts at 0: no collection after the block would promote by chance
    with garbage_collection_paused():
        loaded = [Loaded() for _ in range(2000)]
        garbage = Loaded()
        garbage.itself = garbage  # a cycle: only the collector frees it
        weakref.finalize(garbage, freed.append, "freed")
        del garbage
    oldest = {id(item) for item in gc.get_objects(generation=2)}
    assert all(id(item) in oldest for item in loaded)  # not walked by the young collections
    gc.collect()
    assert freed == ["freed"]  # still the collector's to free
    # Where objects are frozen, they stay so (moving the others would release them).
    gc.freeze()
    try:
        with garbage_collection_paused():
            more = [Loaded() for _ in range(2000)]
        tracked = {id(item) for item in gc.get_objects()}
        assert id(loaded[0]) not in tracked and id(more[0]) in tracked
    finally:
        gc.unfreeze()


def test_a_model_loads_with_the_collector_paused(monkeypatch):
    seen = []

    def model_config(cfg):
        seen.append(gc.isenabled())
        raise FedLoraError("stop here")

    monkeypatch.setattr(common_model, "load_model_config", model_config)
    with pytest.raises(FedLoraError, match="stop here"):
        common_model.build_lora_model(FedLoraConfig())
    assert seen == [False] and gc.isenabled()


def test_a_ray_cluster_that_cannot_be_joined_is_one_line(monkeypatch):
    def unreachable(cfg, address=None, pool=None):
        raise ConnectionError("Could not find any running Ray instance.\nPlease start one")

    monkeypatch.setattr(runner, "start_ray", unreachable)
    with pytest.raises(FedLoraError) as raised:
        runner.start_ray_during(lambda: None, FedLoraConfig(), "10.0.0.9:6379")
    assert str(raised.value) == ("cannot join the Ray cluster at 10.0.0.9:6379: "
                                 "Could not find any running Ray instance.")
