"""Ray's worker set-up hook under `fedlora simulate`: a client process loads its imports, the
base model and the partitioned data (client.app.warm_up) before its first message, from the
pool the driver hands over (simulations/shared_pool.py) when it does.

This and simulations/runner.py, actors.py and shared_pool.py are the simulation's start-up
speed-ups, one seam: the ClientApp knows none of them, and a process without them (`flwr run`,
a deployment) loads on its first message.

Loading is CPU-bound (torch, transformers and flwr imports, then the model) and every process
starts at once. On a machine with few cores they would share the cores with each other and
with the server, which every site waits for, and all finish late. So at most (cores - 1)
processes of a machine load at once, each holding a slot: one core stays with the server, the
first process to load trains first, and the others load as soon as a slot frees. A slot is an
flock on a file in one folder per user and machine: the kernel releases it when the process
exits or dies, so the files hold no state and are never cleaned up, and simulations running
side by side on one machine share its slots as they share its cores. This module imports only
the standard library (and common.gc_pause, which does too), so a process waiting for a slot
costs nothing. A process loads with Python's garbage collector paused (common/gc_pause.py), and
freezes what it loaded (the collector never walks it again).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from common.gc_pause import garbage_collection_paused

RUN_CONFIG_ENV = "FEDLORA_WARM_UP_CONFIG"  # the run_config, as JSON
# The driver writes the pool when its input checks pass: seconds after a process starts.
SHARED_POOL_WAIT_SECONDS = 300.0
SLOT_WAIT_SECONDS = 300.0  # then load anyway: a slow first load must not stall the others
_POLL_SECONDS = 0.05

try:
    import fcntl
except ImportError:  # not POSIX: every process loads at once
    fcntl = None


def slots_folder() -> Path:
    """This user's slot folder on this machine."""
    user = os.getuid() if hasattr(os, "getuid") else "all"
    return Path(tempfile.gettempdir()) / f"fedlora-load-slots-{user}"


def load_slots(cores: int | None = None) -> int:
    """How many processes of a machine with `cores` cores may load at once."""
    return max(1, (cores or os.cpu_count() or 1) - 1)


@contextlib.contextmanager
def load_slot(folder: Path, slots: int, wait: float = SLOT_WAIT_SECONDS) -> Iterator[int | None]:
    """Hold one of `slots` slots in `folder` (the slot's number; None if none freed up in
    `wait` seconds, or there are no slots to be had: no flock, or a folder it cannot write)."""
    log = logging.getLogger("fedlora")
    files = []
    try:
        if fcntl is not None:
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(slots):
                files.append(open(folder / f"slot-{i}.lock", "a"))
    except OSError as err:  # loading at once is slower, not wrong
        log.warning("fedlora: no load slots (%s); loading at once", err)
        for file in files:
            file.close()
        files = []
    if not files:
        yield None
        return
    held: int | None = None
    try:
        deadline = time.monotonic() + wait
        while held is None and time.monotonic() < deadline:
            for i, file in enumerate(files):
                try:
                    fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    continue
                held = i
                break
            else:
                time.sleep(_POLL_SECONDS)
        if held is None:
            log.warning("fedlora: no load slot freed in %.0f s; loading anyway", wait)
        yield held
    finally:
        for file in files:  # closing releases the lock
            file.close()


def warm_up_worker() -> None:
    """The hook itself (Ray imports it by name): the run_config comes in the environment."""
    run_config = json.loads(os.environ[RUN_CONFIG_ENV])
    # What the warm-up loads (imports, the site's model and data) lives as long as this
    # process, which serves this one run: frozen after.
    with load_slot(slots_folder(), load_slots()), garbage_collection_paused(freeze=True):
        warm_up_site_process(run_config)


def warm_up_site_process(run_config: dict) -> None:
    """client.app.warm_up, from the driver's pool if it hands one over for this federation's
    size (SHARED_POOL_ENV), else from the data as the first message would read it."""
    from client.app import warm_up
    from common.config import FedLoraConfig
    from simulations.shared_pool import SHARED_POOL_ENV, read_shared_pool

    try:
        cfg = FedLoraConfig.from_run_config(run_config)
        path = os.environ.get(SHARED_POOL_ENV)
        pool = read_shared_pool(Path(path), SHARED_POOL_WAIT_SECONDS) if path else None
    except Exception as err:  # the first message reports the real error, in its own words
        logging.getLogger("fedlora").warning("fedlora: client warm-up skipped: %s", err)
        return
    if pool is not None and len(pool.partitions) == cfg.num_clients:
        warm_up(cfg, pool.labels, pool.rows, pool.partitions)
    else:
        warm_up(cfg)
