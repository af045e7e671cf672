"""A federation under load and faults on loopback: a TLS SuperLink with SuperNode
authentication, 20 registered SuperNodes (17 of them forwarding to resident site runtimes: 14
as `fedlora supernode --in-process`, as docs/deployment.md advises, 3 through
`flower-supernode`'s process per message; 3 sites without a runtime), a tiny causal LM, 5
rounds. In one run: a SuperNode killed (SIGKILL) mid-round and restarted, a site runtime
killed mid-round and restarted, then the SuperLink and its ServerApp killed mid-run,
restarted, the sites registered again and the run resumed. Bounded in time; every process is
stopped at the end.

The sites run at a lower priority (nice), as if on machines of their own: on 2 cores, 20
SuperNodes and their ClientApp processes would otherwise starve the coordinator. The SuperLink
keeps its state in memory: with flwr 1.42's SQLite database (`--database`) replies were lost
here under 20 sites (the SuperLink's "database is locked", HTTP 500 on a SuperNode's push,
which Flower does not retry: 5 of 20 replies in round 1, 1 in round 3); in memory, none. A
SuperNode restarted at once is refused until the SuperLink has given up on its old process
(exit code 305): the test restarts exited SuperNodes as a service manager would. ~6 min on 2
cores.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import time
from pathlib import Path

import pandas as pd
import psutil
from safetensors.torch import load_file

from client.faults import ENV_VAR as FAULTS
from client.site_link import request_status
from common.errors import FedLoraError
from server.outputs import RunDirectory
from tests.conftest import free_port
from tests.test_deployment import BIN, Processes, _port_free, _run
from tests.test_resume import _kill_tree
from tests.test_site_runtime import site_link_answers

SITES, WITH_RUNTIME, ROUNDS = 20, 17, 5
SITE_NICENESS = 15  # the sites yield the CPU to the coordinator, as if on machines of their own
KILLED_SUPERNODE, KILLED_RUNTIME = 19, 0  # a site without runtime, a site with one
# Sites whose SuperNode is `fedlora supernode --in-process` (the killed runtime's among them):
# no process per message, the ClientApp runs in the SuperNode's executor thread. The other
# runtimes' SuperNodes are flower-supernode, which starts a ClientApp process per message.
IN_PROCESS_SITES = 14
FAULT_ROUND = 2  # both stall in this round (a sleep), so that the kills land mid-round
DEADLINE_SECONDS = 720  # the whole test; it fails, and stops everything, past it


def _wait(what: str, condition, deadline: float, every: float = 0.2):
    while not (value := condition()):
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(every)
    return value


def _node_id(registered: str) -> int:
    return int(re.findall(r"\d{6,}", registered)[-1])


def _rounds(out: Path) -> list[dict]:
    return RunDirectory(out).read_rounds() if (out / "metrics.jsonl").exists() else []


def _has_clientapp(proc: subprocess.Popen) -> bool:
    try:
        return any("clientapp" in " ".join(c.cmdline())
                   for c in psutil.Process(proc.pid).children(recursive=True))
    except psutil.Error:
        return False


def _busy(sock: Path) -> bool:
    try:
        return request_status(sock)["busy"]
    except FedLoraError:
        return False


def test_twenty_sites_survive_killed_supernodes_runtimes_and_superlink(
        banking_instructions, tiny_llama_dir, tmp_path):
    deadline = time.time() + DEADLINE_SECONDS
    env = dict(os.environ, FLWR_HOME=str(tmp_path / "flwr_home"),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    names = [f"site-{i}" for i in range(SITES)]
    _run(env, "fedlora", "certs", "--out", str(tmp_path / "certs"), "--san", "127.0.0.1")
    _run(env, "fedlora", "certs", "--out", str(tmp_path / "keys"),
         *[arg for name in names for arg in ("--site", name)])
    rows = pd.read_json(banking_instructions, lines=True)
    for i, name in enumerate(names):  # 7 to 12 rows a site: its counts identify it
        rows.iloc[10 * i:10 * i + 7 + i % 6].to_json(tmp_path / f"{name}.jsonl",
                                                      orient="records", lines=True)
    rows.iloc[:40].to_json(tmp_path / "coordinator.jsonl", orient="records", lines=True)

    procs = Processes(env, tmp_path)
    port, certs = free_port(), tmp_path / "certs"
    superlink_args = ("flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
                      "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile",
                      str(certs / "server.key"), "--enable-supernode-auth",
                      "--host", "127.0.0.1", "--port",
                      str(port), "--disable-runtime-dependency-installation")
    try:
        superlink = procs.start("superlink", *superlink_args)
        _wait("the SuperLink", lambda: not _port_free(port), deadline)
        _run(env, "fedlora", "connect", "load", "--address", f"127.0.0.1:{port}", "--ca",
             str(certs / "ca.crt"))

        def register() -> dict[str, int]:
            def node_id(name: str) -> int:
                return _node_id(_run(env, "flwr", "supernode", "register",
                                     str(tmp_path / "keys" / f"{name}.pub"), "load").stdout)

            with concurrent.futures.ThreadPoolExecutor(4) as pool:  # a CLI start each
                return dict(zip(names, pool.map(node_id, names)))

        node_ids = register()
        in_process = set(names[KILLED_RUNTIME:KILLED_RUNTIME + IN_PROCESS_SITES])
        site_id = {name: node % 2**31 for name, node in node_ids.items()}

        def stall(name):  # the fault, by the id the site's ClientApp knows itself by
            return {**env, FAULTS: f"{site_id[name]}:sleep=300@{FAULT_ROUND}"}

        def start_runtime(name, suffix=""):
            sock = tmp_path / "sockets" / f"{name}.sock"
            proc = procs.start(f"{name}-runtime{suffix}", "fedlora", "site", "--data",
                               str(tmp_path / f"{name}.jsonl"), "--socket", str(sock),
                               "--model", str(tiny_llama_dir),
                               env=stall(name) if name == names[KILLED_RUNTIME] else None)
            psutil.Process(proc.pid).nice(SITE_NICENESS)
            return proc, sock

        def start_supernode(name, sock, suffix=""):
            node_config = (f"site-runtime='{sock}'" if sock else
                           f"data-path='{tmp_path / f'{name}.jsonl'}'")
            command = (("fedlora", "supernode", "--in-process") if name in in_process
                       else ("flower-supernode",))
            proc = procs.start(f"{name}{suffix}", *command, "--superlink",
                               f"127.0.0.1:{port}", "--root-certificates", str(certs / "ca.crt"),
                               "--auth-supernode-private-key",
                               str(tmp_path / "keys" / f"{name}.key"), "--node-config",
                               node_config, "--port", str(free_port()),
                               env=stall(name) if name == names[KILLED_SUPERNODE] else None)
            psutil.Process(proc.pid).nice(SITE_NICENESS)  # its ClientApps inherit it
            return proc

        runtimes = {name: start_runtime(name) for name in names[:WITH_RUNTIME]}
        for name, (proc, sock) in runtimes.items():  # ready: torch imported, answering
            _wait(f"{name}'s runtime", lambda s=sock: site_link_answers(s), deadline, every=1.0)
        supernodes = {name: start_supernode(name, runtimes.get(name, (None, None))[1])
                      for name in names}

        out = tmp_path / "run"
        overrides = (f"task='causal-lm' model='{tiny_llama_dir}' eval-data='"
                     f"{tmp_path / 'coordinator.jsonl'}' num-rounds={ROUNDS} local-steps=2 "
                     f"batch-size=4 max-length=48 fraction-evaluate=0 min-train-clients=2 "
                     f"min-available-clients={SITES} round-timeout=180 out-dir='{out}'")
        _run(env, "flwr", "run", ".", "load", "--run-config", overrides)  # returns at once

        restarts, last_start = iter(range(1, 1000)), {}

        def revived() -> bool:
            """Restart any SuperNode that exited: the SuperLink refuses to activate a node it
            still counts as connected (until its heartbeat expires), as a service manager
            would retry; always False, for _wait."""
            for name, proc in supernodes.items():
                if proc.poll() is not None and time.time() - last_start.get(name, 0) > 15:
                    last_start[name] = time.time()
                    supernodes[name] = start_supernode(name, runtimes.get(name, (0, None))[1],
                                                       f"-restart{next(restarts)}")
            return False

        def recorded(count: int):
            return lambda: revived() or len(_rounds(out)) >= count

        # Round FAULT_ROUND: the two stalled sites are mid-message; kill both, restart both.
        _wait(f"round {FAULT_ROUND - 1}", recorded(FAULT_ROUND), deadline)
        stalled_node = supernodes[names[KILLED_SUPERNODE]]
        _wait("the stalled SuperNode's ClientApp", lambda: _has_clientapp(stalled_node),
              deadline)
        _kill_tree(stalled_node)
        runtime_proc, sock = runtimes[names[KILLED_RUNTIME]]
        _wait("the stalled runtime", lambda: _busy(sock), deadline)
        _kill_tree(runtime_proc)
        runtimes[names[KILLED_RUNTIME]] = start_runtime(names[KILLED_RUNTIME], "-restarted")
        # The SuperNode comes back once the SuperLink has given up on it (the round ends).
        _wait(f"round {FAULT_ROUND}", recorded(FAULT_ROUND + 1), deadline)

        # Mid-run: the SuperLink and its ServerApp die; restarted on the same database, the
        # sites reconnect and the run resumes from its last checkpoint.
        _wait(f"round {FAULT_ROUND + 1}", recorded(FAULT_ROUND + 2), deadline)
        time.sleep(2)
        assert RunDirectory(out).read_summary()["status"] == "running"
        _kill_tree(superlink)
        superlink = procs.start("superlink-restarted", *superlink_args)
        _wait("the restarted SuperLink", lambda: not _port_free(port), deadline)
        # Its state was in memory: the sites are registered again (new node ids); their
        # SuperNodes, refused meanwhile, exit and are restarted as a service manager would.
        renamed = register()
        _run(env, "flwr", "run", ".", "load", "--run-config", f"{overrides} resume=true")
        _wait("the resumed run's end", lambda: revived() or RunDirectory(out).read_summary()[
            "status"] != "running", deadline, every=1.0)
    finally:
        procs.stop_all()

    summary = RunDirectory(out).read_summary()
    assert summary["status"] == "completed", summary
    rounds = _rounds(out)
    assert [r["round"] for r in rounds] == list(range(ROUNDS + 1))  # every round once
    # Each site's rows less the one it keeps for validation, by node id (both registrations).
    rows_of = {ids[name]: 7 + i % 6 - 1 for ids in (node_ids, renamed)
               for i, name in enumerate(names)}
    killed = {node_ids[names[KILLED_SUPERNODE]], node_ids[names[KILLED_RUNTIME]]}
    for record in rounds[1:]:
        trained = [c["node"] for c in record["train-per-client"]]
        assert len(set(trained)) == len(trained)
        assert record["train"]["num-examples"] == sum(rows_of[n] for n in trained)
        assert all(c["num-examples"] == rows_of[c["node"]]
                   for c in record["train-per-client"])
        live = set((node_ids if set(trained) <= set(node_ids.values()) else renamed).values())
        if record["round"] == FAULT_ROUND:  # both left out, with why, the 18 others in
            assert set(trained) == live - killed, record["dropped"]
            assert {d["node"] for d in record["dropped"]} == killed, record["dropped"]
        else:  # every live site, the two restarted ones again from the next round on
            assert set(trained) == live, (record["round"], record["dropped"])
    # The resumed run's last round: every site, under the ids of its second registration.
    assert {c["node"] for c in rounds[-1]["train-per-client"]} == set(renamed.values())
    adapter = load_file(str(out / "final_adapter" / "adapter_model.safetensors"))
    assert adapter and all(t.isfinite().all() for t in adapter.values())
    assert json.loads((out / "final_adapter" / "adapter_config.json").read_text())[
        "base_model_name_or_path"]
