"""Python's cyclic garbage collector paused while a process loads torch, transformers, peft and
a model: those imports create hundreds of thousands of long-lived objects (modules, classes,
functions), and every 700 of them set off a collection that walks the young ones again, for
almost no garbage. Measured here (one process: the simulation's input checks, then a client's
warm-up): 5.1 CPU s with the collector on, 4.0 off, about 13,000 objects of garbage left (11
MB), which the collector frees once it is on again; a 4-site simulation spends ~1.5 CPU s less
(the driver and each client process ~0.5).

The collector is one switch for the whole process: blocks in several threads, or nested, pause
it together, and it is on again when the last one ends (unless it was off before the first).
"""

from __future__ import annotations

import contextlib
import gc
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_open_blocks = 0
_enabled_before = False


@contextlib.contextmanager
def garbage_collection_paused() -> Iterator[None]:
    """The collector off for the block (and for any other thread meanwhile)."""
    global _open_blocks, _enabled_before
    with _lock:
        if _open_blocks == 0:
            _enabled_before = gc.isenabled()
            gc.disable()
        _open_blocks += 1
    try:
        yield
    finally:
        with _lock:
            _open_blocks -= 1
            if _open_blocks == 0 and _enabled_before:
                gc.enable()
