"""The run directory: everything a run leaves behind, each file written atomically.

    config.json          the resolved config
    environment.json     package versions, the app's git commit, the seeds (and per resume)
    labels.json          the shared label set (classification)
    metrics.jsonl        one JSON object per round (round 0 = the initial adapter)
    final_adapter/       PEFT format: PeftModel.from_pretrained(base, path) loads it onto the
                         base of the pooling its fedlora.json names (common.model's
                         load_base_model builds it)
    best_adapter/        the same, of the best round by the server's selection metric
    summary.json         status (running/completed/failed), final metrics, timing; "running"
                         with .lock held by no process reads as interrupted (run_status)
    checkpoint/          the last complete round (server/checkpoint.py), for resuming
    tensorboard/         event files, when config tensorboard = true
    report.html, plots/  written by `fedlora report`
    local_only.json      `fedlora simulate --local-only`: each site trained alone, scored
    STOP                 made by a user or `fedlora tune`: the run ends after this round
    .lock                flock-ed by the process that runs in the folder, while it lives
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING

from common.atomic import append_line_atomic, atomic_write_text
from common.config import FedLoraConfig
from common.errors import FedLoraError

if TYPE_CHECKING:  # torch and flwr take seconds to import: `fedlora report` needs neither
    from common.model import LoraModel


def default_run_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def check_new_run_dir(path: str | Path) -> None:
    """A new run takes a missing or empty folder, or one that holds an earlier run (which it
    moves aside); any other folder is refused, so that `--out ~` cannot move a home away."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise FedLoraError(f"out-dir {str(path)!r} is a file, not a folder")
    if path.is_dir() and _holds_files(path) and not is_run_directory(path):
        raise FedLoraError(f"out-dir {str(path)!r} holds files but no fedlora run: name a new "
                           f"or empty folder")


def is_run_directory(path: str | Path) -> bool:
    """Whether ``path`` holds a fedlora run (what RunDirectory.create writes first)."""
    return all((Path(path) / name).is_file() for name in ("config.json", "summary.json"))


LOCK_FILE = ".lock"  # held (flock) by the process that runs in the folder
_held_locks: dict[Path, int] = {}  # this process's locks: a path's open descriptor


def check_not_in_use(path: str | Path) -> None:
    """FedLoraError if another process runs in ``path`` now; for checks before a run starts."""
    lock = Path(path) / LOCK_FILE
    if Path(path).resolve() in _held_locks or not lock.is_file():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        _flock_or_refuse(fd, Path(path))
    finally:
        os.close(fd)  # closing releases a lock taken here


def _lock(path: Path) -> None:
    """Hold ``path``'s lock until this process ends; the kernel drops it if the process dies,
    so a killed run never leaves a stale lock behind."""
    key = path.resolve()
    if key in _held_locks:
        return
    fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        _flock_or_refuse(fd, path)
    except FedLoraError:
        os.close(fd)
        raise
    # Who holds it: only a process on the same machine, since the same boot, can tell from
    # /proc/locks whether the holder still lives (lock_held).
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{socket.gethostname()} {_boot_id()} {os.getpid()}\n".encode(), 0)
    _held_locks[key] = fd


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip() or "-"
    except OSError:
        return "-"


def lock_held(path: str | Path) -> bool | None:
    """Whether the process named in ``path``'s .lock still holds it, read from Linux's
    /proc/locks: looking takes no lock, so it never turns away a run that starts at that
    moment. None where it cannot tell: no .lock or no name in it (an older run), no
    /proc/locks, or a lock taken on another machine, container or boot (a run directory on a
    shared file system)."""
    lock_file = Path(path) / LOCK_FILE
    try:
        inode = lock_file.stat().st_ino
        holder = lock_file.read_text(errors="replace").rsplit(None, 2)
        table = Path("/proc/locks").read_text()
    except OSError:
        return None
    boot = _boot_id()
    if len(holder) != 3 or holder[0] != socket.gethostname() or boot == "-" or \
            holder[1] != boot or not holder[2].isdigit():
        return None
    for line in table.splitlines():
        fields = [f for f in line.split() if f != "->"]  # "->": a process waiting for it
        # "1: FLOCK ADVISORY WRITE <pid> <major>:<minor>:<inode> 0 EOF"; the device is left
        # out: on btrfs and overlay file systems it need not be the one stat reports.
        if len(fields) > 5 and fields[1] == "FLOCK" and fields[4] == holder[2] and \
                fields[5].rsplit(":", 1)[-1] == str(inode):
            return True
    return False


def run_status(path: str | Path, summary: dict) -> str:
    """The summary's status, but "interrupted" where it says running and no process holds
    the run's lock: the process that ran it ended without finishing (killed, its machine
    stopped); its checkpoint resumes it."""
    status = str(summary.get("status", "unknown"))
    if status == "running" and lock_held(path) is False:
        return "interrupted"
    return status


def _release(path: Path) -> None:
    fd = _held_locks.pop(path.resolve(), None)
    if fd is not None:
        os.close(fd)


def _holds_files(path: Path) -> bool:
    return any(p.name != LOCK_FILE for p in path.iterdir())


def _flock_or_refuse(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise FedLoraError(f"run directory {str(path)!r} is in use by another fedlora process: "
                           f"wait for it to end, or choose another out-dir") from None


class RunDirectory:
    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    @classmethod
    def create(cls, cfg: FedLoraConfig, labels: list[str] | None) -> "RunDirectory":
        run = cls(cfg.out_dir or default_run_dir())
        check_new_run_dir(run.path)
        if run.path.exists():
            check_not_in_use(run.path)  # a live run's folder is never moved aside
        if run.path.exists() and _holds_files(run.path):
            # A new run must not mix rounds with an old one, nor destroy it: move it aside.
            stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
            kept = run.path.with_name(f"{run.path.name}.old-{stamp}")
            suffix = 1
            while kept.exists():
                kept = run.path.with_name(f"{run.path.name}.old-{stamp}-{suffix}")
                suffix += 1
            _release(run.path)  # the lock file moves aside with the earlier run
            os.replace(run.path, kept)
            logging.getLogger("flwr").warning(
                "fedlora: %s held an earlier run; it was moved to %s", run.path, kept)
        run.path.mkdir(parents=True, exist_ok=True)
        _lock(run.path)
        atomic_write_text(run.path / "config.json", cfg.to_json() + "\n")
        if labels is not None:
            atomic_write_text(run.path / "labels.json", json.dumps(labels, indent=1) + "\n")
        run.write_summary({"status": "running"})
        return run

    @classmethod
    def reopen(cls, cfg: FedLoraConfig) -> "RunDirectory":
        """The directory of an interrupted run, to continue it."""
        run = cls(cfg.out_dir)
        if not cfg.out_dir or not (run.path / "config.json").is_file():
            raise FedLoraError(f"nothing to resume: {cfg.out_dir or '(no out-dir)'} is not a "
                               f"run directory")
        _lock(run.path)
        run.stop_file.unlink(missing_ok=True)  # a stop request ended the earlier process only
        return run

    @property
    def stop_file(self) -> Path:
        """Created by anyone (`touch RUN_DIR/STOP`, or `fedlora tune` pruning a trial): the run
        ends after the round in progress, with its adapters and summary written."""
        return self.path / "STOP"

    def stop_requested(self) -> bool:
        return self.stop_file.exists()

    def record_environment(self, environment: dict, resumed: bool) -> None:
        """environment.json: how the run started (packages, commit, seeds) and, after each
        resume, how it went on: a resume on other versions is visible, not silent."""
        path = self.path / "environment.json"
        record = json.loads(path.read_text()) if resumed and path.exists() else {}
        if resumed:
            record.setdefault("resumes", []).append(environment)
        else:
            record = {"started": environment}
        atomic_write_text(path, json.dumps(record, indent=1) + "\n")

    def saved_config(self) -> dict:
        return json.loads((self.path / "config.json").read_text())

    def config_to_resume(self) -> dict:
        """The run's config.json; FedLoraError where it is missing, cut short or not a dict."""
        path = self.path / "config.json"
        try:
            saved = self.saved_config()
        except (OSError, ValueError) as err:
            raise FedLoraError(f"{path} cannot be read ({type(err).__name__}: {err}): the run "
                               f"cannot be resumed") from None
        if not isinstance(saved, dict):
            raise FedLoraError(f"{path} holds no config (a JSON object): the run cannot be "
                               f"resumed")
        return saved

    def keep_rounds_through(self, last_round: int) -> None:
        """Drop rounds a crash recorded after its last checkpoint: each round once."""
        kept = [r for r in self.read_rounds() if r["round"] <= last_round]
        atomic_write_text(self.metrics_file, "".join(json.dumps(r, sort_keys=True) + "\n"
                                                     for r in kept))

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoint"

    @property
    def metrics_file(self) -> Path:
        return self.path / "metrics.jsonl"

    @property
    def final_adapter(self) -> Path:
        return self.path / "final_adapter"

    def append_round(self, record: dict) -> None:
        append_line_atomic(self.metrics_file, json.dumps(record, sort_keys=True))

    def read_rounds(self) -> list[dict]:
        if not self.metrics_file.exists():
            return []
        return [json.loads(line) for line in self.metrics_file.read_text().splitlines() if line]

    @property
    def local_only_file(self) -> Path:
        """Each site trained alone, scored on its own rows (`fedlora simulate --local-only`)."""
        return self.path / "local_only.json"

    def write_local_only(self, sites: list[dict], rounds: int) -> None:
        """`rounds`: the federation's rounds whose local training each site had alone."""
        atomic_write_text(self.local_only_file,
                          json.dumps({"rounds": rounds, "sites": sites}, indent=2) + "\n")

    def read_local_only(self) -> list[dict] | None:
        """The sites of local_only.json; None without one; ValueError where it holds no list
        of sites."""
        if not self.local_only_file.is_file():
            return None
        held = json.loads(self.local_only_file.read_text())
        sites = held.get("sites") if isinstance(held, dict) else None
        if not isinstance(sites, list) or not all(isinstance(s, dict) for s in sites):
            raise ValueError("no list of sites under 'sites'")
        return sites

    def write_summary(self, summary: dict) -> None:
        atomic_write_text(self.path / "summary.json", json.dumps(summary, indent=2) + "\n")

    def read_summary(self) -> dict:
        path = self.path / "summary.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def save_adapter(self, lora: LoraModel, labels: list[str] | None,
                     folder: str = "final_adapter") -> None:
        """The adapter in PEFT format: final_adapter/ (the last round's), best_adapter/."""
        from common.adapters import save_adapter_folder

        save_adapter_folder(lora, labels, self.path / folder)
