"""fedlora's simulation actors: Flower's actor contract, started with Ray, taken by Flower's
pool."""

from __future__ import annotations

import os

import pytest

from common.config import FedLoraConfig
from common.flower_compat import ClientAppException, LoadClientAppError
from simulations import runner
from simulations.actors import SiteActor, flower_pool_takes
from tests.conftest import assert_python_runs


def _app_that(answer):
    return lambda: (lambda message, context: answer(message))


def _fails(error):
    def answer(message):
        raise error
    return answer


def test_a_site_actor_answers_and_fails_as_flowers_actor_does():
    actor = SiteActor()
    assert actor.run(_app_that(lambda m: m + "!"), "ping", "3", {"k": 1}) == \
        ("3", "ping!", {"k": 1})
    with pytest.raises(ClientAppException, match="3 rows are empty") as raised:
        actor.run(_app_that(_fails(ValueError("3 rows are empty"))), "ping", "3", {})
    assert isinstance(raised.value.__cause__, ValueError)
    with pytest.raises(LoadClientAppError):  # passed on as it is, as Flower's actor does
        actor.run(_app_that(_fails(LoadClientAppError("no app"))), "ping", "3", {})


def test_the_driver_makes_site_actors_without_importing_flwr_torch_or_ray():
    code = ("import sys\n"
            "import simulations.actors\n"
            "heavy = {m.split('.')[0] for m in sys.modules} & {'flwr', 'torch', 'ray'}\n"
            "assert not heavy, heavy\n")
    assert_python_runs(code)


def test_ray_starts_the_actors_that_may_load_and_flowers_pool_takes_them(tmp_path, monkeypatch):
    import ray

    from common.flower_compat import BasicActorPool, ClientAppActor

    # Two actors fit on any machine; one may load at a time. The data is missing, so each
    # process's warm-up gives up at once (and leaves the error to a first message).
    cfg = FedLoraConfig(data=str(tmp_path / "missing.csv"),
                        client_num_cpus=(os.cpu_count() or 2) / 2)
    monkeypatch.setattr(runner, "load_slots", lambda: 1)
    flowers = BasicActorPool.add_actors_to_pool
    runner.start_ray(cfg)
    try:
        started = list(runner._STARTED_ACTORS)
        assert len(started) == 1
        with flower_pool_takes(runner._STARTED_ACTORS):
            pool = BasicActorPool(ClientAppActor, runner.backend_config(cfg)["client_resources"],
                                  {})  # as Flower's Ray backend builds it
            pool.add_actors_to_pool(pool.actors_capacity)
        assert BasicActorPool.add_actors_to_pool is flowers  # Flower's own again
        assert pool.num_actors == len(pool.pool) == 2
        assert pool.pool[0] is started[0]  # the one started with Ray, then one made as needed
        assert runner._STARTED_ACTORS == []
        # Each answers; neither process imported flwr.simulation, as Flower's actor class would.
        simulation_loaded = _app_that(lambda m: "flwr.simulation" in __import__("sys").modules)
        replies = ray.get([actor.run.remote(simulation_loaded, "ping", str(i), {})
                           for i, actor in enumerate(pool.pool)], timeout=180)
        assert replies == [("0", False, {}), ("1", False, {})]
    finally:
        runner.stop_ray()
    assert runner._STARTED_ACTORS == [] and not ray.is_initialized()
