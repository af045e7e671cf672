"""Flower's non-public modules are reached through common/flower_compat.py alone, and an
unsupported Flower stops fedlora with one line naming it."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from common.flower_compat import _NAMES, check_flower_version
from tests.conftest import REPO, not_stored_at_first

# Flower's public API: the Message API packages, and the legacy packages SecAgg+ lives in.
PUBLIC = ("flwr.app", "flwr.clientapp", "flwr.serverapp", "flwr.serverapp.strategy",
          "flwr.common", "flwr.server", "flwr.server.strategy", "flwr.server.workflow",
          "flwr.client.mod", "flwr.clientapp.mod")
IMPORT = re.compile(r"^\s*(?:from\s+(flwr[\w.]*)\s+import|import\s+(flwr[\w.]*))", re.M)


def test_non_public_flower_imports_live_in_the_compat_module_only():
    offenders = []
    for folder in ("common", "server", "client", "simulations", "tests", "bench"):
        for path in sorted((REPO / folder).rglob("*.py")):
            if path.name == "flower_compat.py":
                continue
            for match in IMPORT.finditer(path.read_text()):
                module = match.group(1) or match.group(2)
                if module not in PUBLIC:
                    offenders.append(f"{path.relative_to(REPO)}: {module}")
    assert offenders == []


def test_every_compat_name_resolves_on_the_installed_flower():
    import common.flower_compat as compat

    for name, (module, _) in _NAMES.items():
        assert getattr(compat, name) is not None, (name, module)


@pytest.mark.parametrize("installed", ["1.41.0", "1.42.0", "1.42.3"])
def test_supported_flower_versions_pass(installed):
    check_flower_version(installed)


@pytest.mark.parametrize("installed", ["1.40.2", "1.43.0", "2.0.0", "none"])
def test_an_unsupported_flower_is_one_line(installed):
    with pytest.raises(SystemExit) as stopped:
        check_flower_version(installed)
    message = str(stopped.value)
    assert f"flwr {installed} is installed; fedlora supports flwr 1.41 and 1.42" in message
    assert "\n" not in message


def test_the_cli_stops_with_that_line_under_an_unsupported_flower():
    code = ("import importlib.metadata as m; real = m.version\n"
            "m.version = lambda name: '1.43.0' if name == 'flwr' else real(name)\n"
            "from simulations.cli import main; main(['simulate', '--help'])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "fedlora: error: flwr 1.43.0 is installed; fedlora supports flwr 1.41 and 1.42 "
        "(pip install 'flwr[simulation,dp]>=1.41,<1.43')"]


def test_fedlora_supernode_paces_flowers_loop_and_passes_flowers_arguments(monkeypatch, capsys):
    """Flower's SuperNode loop sleeps 3 s after each look at the SuperLink that found nothing;
    under `fedlora supernode` no sleep of that loop lasts longer than --poll-interval, its
    clock is otherwise the real one, and flower-supernode gets its arguments as given."""
    import importlib
    import os
    import time

    from simulations.cli import main

    loop = importlib.import_module("flwr.supernode.start_client_internal")
    cli = importlib.import_module("flwr.supernode.cli")
    monkeypatch.setattr(loop, "time", loop.time)  # put back after the test
    monkeypatch.setattr(loop, "pull_objects", loop.pull_objects)
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    monkeypatch.delenv("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", raising=False)
    seen = {}

    def flower_supernode():  # stands in for Flower's CLI: what its loop would do when idle
        seen["argv"] = list(sys.argv)
        started = time.monotonic()
        loop.time.sleep(3)  # the empty look's wait in 1.41/1.42
        seen["slept"] = time.monotonic() - started
        started = time.monotonic()
        loop.time.sleep(0.5)  # its wait for the ClientApp's reply
        seen["waited"] = time.monotonic() - started
        seen["clock"] = loop.time.time() - time.time()
        started = time.monotonic()
        seen["pulled"] = loop.pull_objects(["object"], pull_object_fn=not_stored_at_first())
        seen["retried"] = time.monotonic() - started

    monkeypatch.setattr(cli, "flower_supernode", flower_supernode)
    flower_args = ["--superlink", "127.0.0.1:9092", "--insecure", "--port", "9095"]
    assert main(["supernode", "--poll-interval", "0.2", *flower_args]) == 0
    assert seen["argv"] == ["flower-supernode", *flower_args]
    assert 0.15 < seen["slept"] < 1.0 and 0.04 < seen["waited"] < 0.3, seen
    assert abs(seen["clock"]) < 1.0
    # An object the SuperLink does not hold yet is asked for again within 0.05 s (Flower: 1 s)
    assert seen["pulled"] == {"object": b"bytes"} and seen["retried"] < 0.5, seen
    assert os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] == "0.1"

    seen.clear()
    for bad in ("0", "5", "nan"):
        assert main(["supernode", "--poll-interval", bad, *flower_args]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("fedlora: error: supernode: --poll-interval") and "\n" not in err
    assert main(["supernode", "--in-process", "--isolation=subprocess", *flower_args]) == 2
    err = capsys.readouterr().err.strip()
    assert "--in-process runs the ClientApp itself" in err and "\n" not in err
    assert main(["report", "runs/x", "--superlink", "a"]) == 2  # not passed on elsewhere
    assert "unrecognized arguments: --superlink a" in capsys.readouterr().err
    assert seen == {}


def test_the_in_process_executor_asks_for_tasks_when_the_supernode_stores_a_message(
        monkeypatch):
    """`fedlora supernode --in-process`: the SuperNode's loop, in the same process, tells its
    executor thread when it has stored a message; idle, the executor asks the SuperNode's API
    once a second (EXECUTOR_IDLE_SECONDS), not every 0.05 s."""
    import importlib
    import threading
    import time
    import types

    from common import flower_compat

    runtime = importlib.import_module("flwr.supercore.runtime")
    asks, finished = [], threading.Event()

    class SuperNodeAPI:  # answers AcquireTask with "no task"
        def AcquireTask(self, request):  # noqa: N802 - Flower's name
            if finished.is_set():
                threading.Event().wait()  # the daemon thread parks once the test is over
            asks.append(time.monotonic())
            return types.SimpleNamespace(HasField=lambda name: False, token="")

    monkeypatch.setattr(runtime.RuntimeHttpClient, "from_server_address",
                        classmethod(lambda cls, **kwargs: SuperNodeAPI()))
    loop = types.ModuleType("loop")
    loop._pull_and_store_message = lambda message: message  # the run id, or None: none stored
    stored = flower_compat._signal_stored_messages(loop)
    try:
        threading.Thread(target=flower_compat.serve_clientapp_tasks, daemon=True,
                         args=("127.0.0.1:1", None, "fedlora"),
                         kwargs={"poll_seconds": 0.05, "stored": stored}).start()
        time.sleep(0.6)
        assert len(asks) == 1  # the first ask; the next after 1 s, or when told
        assert loop._pull_and_store_message(None) is None  # an empty look at the SuperLink
        time.sleep(0.2)
        assert len(asks) == 1
        told = time.monotonic()
        assert loop._pull_and_store_message(7) == 7  # a message of run 7 stored
        time.sleep(0.2)
        assert len(asks) == 2 and asks[1] - told < 0.15
    finally:
        finished.set()
