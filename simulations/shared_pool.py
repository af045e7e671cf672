"""A simulation's training pool, handed by its driver to the client processes.

`fedlora simulate` reads, checks and partitions the pool before the run starts. Each client
process would then do the same again on its way to its first message: import datasets and
pandas, parse the file, partition it (~1 s of CPU on the way to the first training step). So
the driver writes what it read to one file, and the processes read that instead. The file's
folder is named in the workers' environment; a process on another machine of a Ray cluster,
where there is no such folder, reads the data itself. Standard library only: the driver
imports it before torch.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from common.atomic import atomic_write_text

SHARED_POOL_ENV = "FEDLORA_SHARED_POOL"  # the file's path, in the client processes' environment
_POLL_SECONDS = 0.05


class Rows:
    """Rows held as two lists: what fedlora uses of a datasets.Dataset read by common/data.py
    (its length, a "text" or "target" column, select)."""

    def __init__(self, text: list[str], target: list[str]):
        if len(text) != len(target):
            raise ValueError(f"{len(text)} texts but {len(target)} targets")
        self._columns = {"text": text, "target": target}

    def __len__(self) -> int:
        return len(self._columns["text"])

    def __getitem__(self, column: str) -> list[str]:
        return self._columns[column]

    def select(self, indices: Sequence[int]) -> Rows:
        return Rows(*([values[i] for i in indices] for values in self._columns.values()))


@dataclass
class SharedPool:
    rows: Rows
    labels: list[str] | None  # the shared label set (classification)
    partitions: list[list[int]]  # row indices of each site


def write_shared_pool(path: Path, pool: SharedPool | None) -> None:
    """Hand `pool` over, or (None) tell the processes waiting for one to read the data
    themselves."""
    saved = None if pool is None else {
        "text": pool.rows["text"], "target": pool.rows["target"], "labels": pool.labels,
        "partitions": pool.partitions}
    atomic_write_text(path, json.dumps(saved))


class PoolWithdrawn(Exception):
    """The run ended before its driver handed a pool over: nothing is left to load for."""


def read_shared_pool(path: Path, timeout: float) -> SharedPool | None:
    """The pool once the driver has handed it over (it does when its input checks pass);
    None if it handed none over, nothing within `timeout` seconds, or this process runs on
    another machine (the folder, made before Ray started, is not here). Raises PoolWithdrawn
    when the run ends first: the driver removed the folder, or this process lost its parent
    (Ray's raylet), which it would not notice while it waits here."""
    if not path.parent.is_dir():
        return None
    deadline, parent = time.monotonic() + timeout, os.getppid()
    while not path.exists():
        if not path.parent.is_dir() or os.getppid() != parent:
            raise PoolWithdrawn("the run ended before its data pool was handed over")
        if time.monotonic() >= deadline:
            return None
        time.sleep(_POLL_SECONDS)
    saved = json.loads(path.read_text())
    if saved is None:
        return None
    return SharedPool(Rows(saved["text"], saved["target"]), saved["labels"], saved["partitions"])
