"""Checksums of what a folder holds (a checkpoint, an adapter), written beside its files and
checked when it is loaded: flipped or missing bytes are an error that names the file, not a
silently different model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from common.errors import FedLoraError

CHECKSUMS_FILE = "checksums.json"


def write_checksums(folder: str | Path) -> None:
    """checksums.json: the SHA-256 of every file below ``folder``."""
    folder = Path(folder)
    sums = {path.relative_to(folder).as_posix(): _sha256(path)
            for path in sorted(folder.rglob("*")) if path.is_file()
            and path.name != CHECKSUMS_FILE}
    (folder / CHECKSUMS_FILE).write_text(json.dumps(sums, indent=1) + "\n")


def verify_checksums(folder: str | Path, what: str) -> None:
    """FedLoraError naming the first file of ``folder`` that is missing or not what was
    written. A folder without checksums (older, or made by other tools) is taken as it is."""
    folder = Path(folder)
    listing = folder / CHECKSUMS_FILE
    if not listing.is_file():
        return
    try:
        sums = json.loads(listing.read_text())
        items = sorted(sums.items())
    except (OSError, ValueError, AttributeError) as err:
        raise FedLoraError(f"{what} {str(folder)!r} is corrupt: its {CHECKSUMS_FILE} cannot be "
                           f"read ({type(err).__name__})") from None
    for name, expected in items:
        path = folder / name
        if not path.is_file():
            raise FedLoraError(f"{what} {str(folder)!r} is corrupt: {name} is missing")
        if _sha256(path) != expected:
            raise FedLoraError(f"{what} {str(folder)!r} is corrupt: {name} is not what was "
                               f"written (its checksum differs)")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
