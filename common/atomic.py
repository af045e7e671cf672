"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_bytes(path: str | Path, data: bytes, mode: int = 0o644) -> None:
    """The temporary file is created 0600 (mkstemp), so a private key is never readable by
    others, not even for a moment; it gets `mode` before it takes the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def append_line_atomic(path: str | Path, line: str) -> None:
    """Append one line by rewriting the file atomically (files here are small: one line a round)."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    atomic_write_text(path, old + line.rstrip("\n") + "\n")


@contextmanager
def atomic_directory(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling folder to fill; it replaces ``path`` only if the block succeeds.

    Two renames swap the folders (POSIX has no portable atomic exchange): the old folder goes
    aside to ``.NAME.old``, then the new one takes the name. A kill between them leaves only
    the aside copy, which `recover_directory` (called here and by every reader) puts back."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    recover_directory(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if path.exists():
            old = _aside(path)
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_directory(path.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def recover_directory(path: str | Path) -> Path:
    """``path``, with the old version put back if a replacement was killed between its two
    renames (the folder missing, its aside copy whole)."""
    path = Path(path)
    aside = _aside(path)
    if not path.exists() and aside.is_dir():
        os.replace(aside, path)
        _fsync_directory(path.parent)
    return path


def readable_directory(path: str | Path) -> Path:
    """``path``, or its aside copy where a replacement was killed between its renames; for a
    reader that must not change the folder (it may not own it)."""
    path = Path(path)
    aside = _aside(path)
    return aside if not path.exists() and aside.is_dir() else path


def _aside(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def _fsync_tree(folder: Path) -> None:
    """Flush every file and folder below ``folder`` to disk, so that the rename that publishes
    it cannot reach the disk before its contents do."""
    for root, _, files in os.walk(folder):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_directory(Path(root))


def _fsync_directory(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
