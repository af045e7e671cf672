"""Run the fedlora Flower App as a local simulation, in this process, on Ray.

This is what `flwr run .` does on a local SuperLink, minus the SuperLink: the same ServerApp
and ClientApp components (loaded from pyproject.toml), the same fused run_config, one virtual
SuperNode per simulated site. Flower 1.41 has no public API that takes a run_config, so we call
its simulation runtime the way `flwr-simulation` does; flwr is pinned below 1.42 for this.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import threading
import tomllib
from collections.abc import Callable
from pathlib import Path

from common.config import FedLoraConfig
from common.errors import FedLoraError, first_line
from common.gc_pause import garbage_collection_paused
from simulations.actors import flower_pool_takes, pool_capacity, start_site_actors
from simulations.shared_pool import SHARED_POOL_ENV, SharedPool, write_shared_pool
from simulations.startup import RUN_CONFIG_ENV, load_slots

APP_DIR = Path(__file__).resolve().parent.parent
# Site actors start_ray started, until Flower's pool takes them (or Ray stops).
_STARTED_ACTORS: list = []
# The folder of the pool start_ray_during hands to the client processes, until Ray stops.
_SHARED_POOL_FOLDERS: list[Path] = []
CHECKS_NICENESS = 19  # the input checks' thread's, while Ray starts
# How often a waiting libgomp thread spins before it sleeps (wait_briefly_on_shared_cores): as
# fast as libgomp's 300,000 for the server's scoring alone (2.6-2.7 s here), not spinning
# away the cores the sites train on.
SHARED_CORES_SPIN_COUNT = 3000


def backend_config(cfg: FedLoraConfig, ray_address: str | None = None) -> dict:
    """Flower's Ray backend options: a Ray instance of this machine's cores, or (ray_address)
    an existing cluster, whose nodes bring their own CPUs and GPUs."""
    if ray_address:
        init_args = {"address": ray_address, "logging_level": logging.ERROR,
                     "log_to_driver": False}
    else:
        # "local": a new instance even when `ray start` left a cluster (or its address file)
        # on this machine, which ray.init() would otherwise join and refuse num_cpus for.
        init_args = {"address": "local", "num_cpus": os.cpu_count() or 1,
                     "include_dashboard": False, "logging_level": logging.ERROR,
                     "log_to_driver": False,
                     # Ray runs workers at nice 15 by default: the sites would then yield to
                     # the server's round-0 evaluation, which should yield to them.
                     "_system_config": {"worker_niceness": 0, "enable_worker_prestart": False,
                                        "prestart_worker_first_driver": False}}
    return {"client_resources": {"num_cpus": cfg.client_num_cpus, "num_gpus": cfg.client_num_gpus},
            "init_args": init_args}


def app_components(app_dir: Path = APP_DIR) -> tuple[str, str]:
    project = tomllib.loads((app_dir / "pyproject.toml").read_text())
    components = project["tool"]["flwr"]["app"]["components"]
    return components["serverapp"], components["clientapp"]


def simulate(cfg: FedLoraConfig, verbose: bool = False, ray_address: str | None = None) -> None:
    """Run cfg.num_rounds rounds over cfg.num_clients simulated sites; raise if the run fails.
    With ray_address, on that Ray cluster instead of a Ray instance of this machine. Ray is
    started here unless start_ray_during already did."""
    import ray
    from flwr.app import Context, RecordDict

    from common.flower_compat import (
        NOOP_FEDERATION_ID,
        RUN_ID_NUM_BYTES,
        SUPERLINK_NODE_ID,
        TASK_ID_NUM_BYTES,
        EventType,
        Run,
        generate_rand_int_from_bytes,
        run_simulation_in_process,
        set_task_identity,
    )

    serverapp, clientapp = app_components()
    run_config = cfg.to_run_config()
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    run.override_config = run_config
    set_task_identity(run_id=run.run_id, task_id=1, node_id=SUPERLINK_NODE_ID)
    context = Context(run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(),
                      run_config=run_config)
    if not ray.is_initialized():
        start_ray(cfg, ray_address)
    try:
        with flower_pool_takes(_STARTED_ACTORS):
            run_simulation_in_process(
                num_supernodes=cfg.num_clients,
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE, server_app_attr=serverapp,
                client_app_attr=clientapp, backend_name="ray",
                backend_config=backend_config(cfg, ray_address),
                app_dir=str(APP_DIR), run=run, server_app_context=context, is_app=True,
                verbose_logging=verbose)
    finally:
        stop_ray()  # Flower shuts Ray down itself, unless it failed first


def start_ray(cfg: FedLoraConfig, ray_address: str | None = None,
              shared_pool: Path | None = None) -> None:
    """Ray as Flower's backend would start it (which then leaves it as it is), plus a worker
    set-up hook: every client process loads its imports, base model and data while the server
    prepares, instead of on its first message (simulations/startup.py). The client processes that
    may load at once start with it (simulations/actors.py). With `shared_pool`, they wait
    for the data there (simulations/shared_pool.py): a file that must then be written."""
    import ray

    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Workers do not inherit this process's sys.path changes, only the environment.
    pythonpath = os.pathsep.join([str(APP_DIR), *sys.path, os.environ.get("PYTHONPATH", "")])
    os.environ["PYTHONPATH"] = pythonpath
    env = {"PYTHONPATH": pythonpath, RUN_CONFIG_ENV: json.dumps(cfg.to_run_config())}
    if shared_pool is not None:
        env[SHARED_POOL_ENV] = str(shared_pool)
    # Named, not passed: the driver need not import torch and transformers to start Ray.
    backend = backend_config(cfg, ray_address)
    ray.init(runtime_env={"env_vars": env,
                          "worker_process_setup_hook": "simulations.startup.warm_up_worker"},
             **backend["init_args"])
    resources = backend["client_resources"]
    # Only those that may load at once: the others would boot now only to wait for a slot.
    count = min(pool_capacity(resources), load_slots())
    _STARTED_ACTORS[:] = start_site_actors(resources, count)


def stop_ray() -> None:
    import ray

    _STARTED_ACTORS.clear()
    if ray.is_initialized():
        ray.shutdown()
    _drop_shared_pools()


def _drop_shared_pools() -> None:
    while _SHARED_POOL_FOLDERS:
        shutil.rmtree(_SHARED_POOL_FOLDERS.pop(), ignore_errors=True)


def _new_pool_file() -> Path | None:
    """Where the checks' pool will be, in a folder made now, before Ray starts: a client
    process that does not find the folder is on another machine. None if no folder can be
    made (the processes then read the data themselves)."""
    remove_abandoned_pools()
    try:
        folder = Path(tempfile.mkdtemp(prefix=f"fedlora-pool-{os.getpid()}-"))
    except OSError as err:
        logging.getLogger("fedlora").warning(
            "fedlora: no folder for the shared data pool (%s); client processes read the "
            "data themselves", err)
        return None
    _SHARED_POOL_FOLDERS.append(folder)
    return folder / "pool.json"


def remove_abandoned_pools(folder: Path | None = None) -> None:
    """Remove the shared-pool folders (fedlora-pool-PID-*) whose command is gone: a killed
    run cannot remove its own."""
    for pool in Path(folder or tempfile.gettempdir()).glob("fedlora-pool-*-*"):
        try:
            os.kill(int(pool.name.split("-")[2]), 0)
        except ProcessLookupError:
            shutil.rmtree(pool, ignore_errors=True)
        except (ValueError, OSError):  # not one of ours, or another user's command
            continue


@contextlib.contextmanager
def _stderr_silenced():
    """File descriptor 2 on /dev/null for the block: Ray's C++ logs bypass sys.stderr."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _at_low_priority(checks: Callable[[], SharedPool | None]) -> SharedPool | None:
    """Run `checks` in this thread at niceness CHECKS_NICENESS (Linux, where a thread has its
    own). Ray's start is on the way to the first training step and the checks are not: its
    processes need the cores the checks would take (~1 s of its ~5 s on 2 cores). The
    thread ends with the checks."""
    if sys.platform == "linux":
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), CHECKS_NICENESS)
        except OSError:  # slower, not wrong
            pass
    return checks()


def wait_briefly_on_shared_cores() -> None:
    """Before torch is imported here (and before Ray's processes inherit the environment): make
    libgomp's threads, which torch runs on, sleep after SHARED_CORES_SPIN_COUNT spins, not
    300,000, when they wait for each other at the end of a parallel step. The server scores
    the global model on all cores while the sites' processes train or evaluate on the same
    ones; a thread that spins then holds a core a site needs while it waits for a thread that
    has none. Measured here: one scoring of 1,000 queries took 12 CPU s instead of 5.4 beside
    two busy processes, and as fast as before alone. A value the user set stays."""
    os.environ.setdefault("GOMP_SPINCOUNT", str(SHARED_CORES_SPIN_COUNT))


def start_ray_during(checks: Callable[[], SharedPool | None], cfg: FedLoraConfig,
                     ray_address: str | None = None) -> None:
    """Start Ray while `checks` run in a low-priority thread: Ray's start-up (seconds of its
    own processes) overlaps the slower input checks. If the checks raise, Ray is stopped and
    their error raised. The pool they return is handed to the client processes on this
    machine (simulations/shared_pool.py). First of all, as nothing has imported torch yet, the
    simulation's OpenMP threads are told to wait briefly (wait_briefly_on_shared_cores). Ray's
    start and the checks import much: Python's garbage collector waits meanwhile
    (common/gc_pause.py)."""
    wait_briefly_on_shared_cores()
    with garbage_collection_paused():
        _start_ray_during(checks, cfg, ray_address)


def _start_ray_during(checks: Callable[[], SharedPool | None], cfg: FedLoraConfig,
                      ray_address: str | None) -> None:
    import ray  # noqa: F401  (here, before the checks' imports contend for the GIL)

    pool_file = _new_pool_file()
    with concurrent.futures.ThreadPoolExecutor(1) as threads:
        checked = threads.submit(_at_low_priority, checks)
        try:
            start_ray(cfg, ray_address, pool_file)
        except BaseException as err:
            _drop_shared_pools()
            checked.result()  # bad input is the better message than a failed start
            if isinstance(err, Exception):
                where = f"join the Ray cluster at {ray_address}" if ray_address else "start Ray"
                raise FedLoraError(f"cannot {where}: {first_line(err)}") from err
            raise
        try:
            pool = checked.result()
        except BaseException:
            # Ray may still be registering the site actors it was asked for: its core worker
            # then logs their cancellation on stderr, above the one-line error of the input.
            with _stderr_silenced():
                stop_ray()
            raise
    try:
        if pool_file is not None:
            write_shared_pool(pool_file, pool)
    except OSError as err:  # slower, not wrong
        logging.getLogger("fedlora").warning(
            "fedlora: cannot hand the data to the client processes (%s); they load it on "
            "their first message", err)
        _drop_shared_pools()  # the processes waiting for it stop waiting
    except BaseException:
        stop_ray()
        raise
