"""A real deployment on loopback, as docs/deployment.md sets it up: a SuperLink with TLS,
SuperNode authentication and a database bound to 127.0.0.1, `fedlora gateway` on the port the
sites use, two authenticated SuperNodes each with its own BANKING77 slice, `flwr run .
<connection>`; then the refusals: an unregistered key, a plaintext connection, a certificate from
another CA, and a site's machine (ca.crt in hand) trying the coordinator's commands through the
sites' port. Every process started here is stopped, and its ports are free afterwards."""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from common.config import FedLoraConfig
from server.outputs import RunDirectory
from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


class Processes:
    """Processes started in their own session, so that stopping one stops what it spawned
    (the SuperLink's ServerApp, a SuperNode's ClientApp and SuperExec)."""

    def __init__(self, env: dict[str, str], logs: Path):
        self.env, self.logs, self.started = env, logs, []

    def start(self, name: str, *args: str, env: dict | None = None) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=REPO, env=env or self.env,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop_all(self) -> None:
        self.stop([proc for proc, _ in self.started])

    def stop(self, procs: list[subprocess.Popen]) -> None:
        for proc, log in [(p, log) for p, log in self.started if p in procs]:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass
            # What the leader spawned (ServerApp, ClientApp, SuperExec) may outlive it.
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait(timeout=10)
            log.close()
        self.started = [(p, log) for p, log in self.started if p not in procs]


def _run(env, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / args[0]), *args[1:]], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return result


@pytest.fixture(scope="module")
def federation(banking77_dir, tmp_path_factory):
    """The coordinator's side: credentials, a TLS SuperLink with SuperNode authentication and a
    database, a saved connection, the two sites' public keys registered."""
    root = tmp_path_factory.mktemp("deployment")
    env = dict(os.environ, FLWR_HOME=str(root / "flwr_home"),
               PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    _run(env, "fedlora", "certs", "--out", str(root / "certs"), "--san", "localhost",
         "--san", "127.0.0.1")
    _run(env, "fedlora", "certs", "--out", str(root / "keys"), "--site", "site-a",
         "--site", "site-b", "--site", "unregistered")
    _run(env, "fedlora", "certs", "--out", str(root / "other-ca"), "--san", "127.0.0.1")
    # Each site a disjoint slice of ten intents; the coordinator holds a test set only.
    train = pd.read_csv(banking77_dir / "train.csv")
    test = pd.read_csv(banking77_dir / "test.csv")
    intents = sorted(train["category"].unique())[:10]
    pool = train[train.category.isin(intents)].groupby("category").head(30)
    pool.iloc[0::2].to_csv(root / "site-a.csv", index=False)
    pool.iloc[1::2].to_csv(root / "site-b.csv", index=False)
    test[test.category.isin(intents)].groupby("category").head(10).to_csv(
        root / "coordinator-test.csv", index=False)

    # `superlink_port` is the coordinator's own (127.0.0.1 only in a real deployment); the
    # sites, and anyone else, reach only the gateway's `port`.
    superlink_port, port = free_port(), free_port()
    procs = Processes(env, root)
    try:
        certs = root / "certs"
        procs.start("superlink", "flower-superlink", "--ssl-ca-certfile", str(certs / "ca.crt"),
                    "--ssl-certfile", str(certs / "server.crt"), "--ssl-keyfile",
                    str(certs / "server.key"), "--enable-supernode-auth", "--database",
                    str(root / "superlink.db"), "--host", "127.0.0.1", "--port",
                    str(superlink_port), "--disable-runtime-dependency-installation")
        procs.start("gateway", "fedlora", "gateway", "--listen", f"127.0.0.1:{port}",
                    "--superlink", f"127.0.0.1:{superlink_port}", "--certs", str(certs))
        deadline = time.time() + 60
        while _port_free(superlink_port) or _port_free(port):
            assert time.time() < deadline, procs.log("superlink") + procs.log("gateway")
            time.sleep(0.5)
        _run(env, "fedlora", "connect", "consortium", "--address",
             f"127.0.0.1:{superlink_port}", "--ca", str(certs / "ca.crt"))
        for site in ("site-a", "site-b"):
            _run(env, "flwr", "supernode", "register", str(root / "keys" / f"{site}.pub"),
                 "consortium")
        listed = _run(env, "flwr", "supernode", "list", "consortium", "--format", "json")
        assert len(json.loads(listed.stdout)["nodes"]) == 2, listed.stdout
        yield {"root": root, "port": port, "superlink-port": superlink_port, "env": env,
               "procs": procs}
    finally:
        procs.stop_all()
    deadline = time.time() + 20
    while not (_port_free(port) and _port_free(superlink_port)):
        assert time.time() < deadline, f"port {port} or {superlink_port} still in use"
        time.sleep(0.5)


def _supernode(fed, name: str, key: str | None, ca: Path | None, data: str,
               insecure: bool = False, node_config: str | None = None,
               command: tuple[str, ...] = ("flower-supernode",)
               ) -> tuple[subprocess.Popen, int]:
    args = [*command, "--superlink", f"127.0.0.1:{fed['port']}", "--node-config",
            node_config or f"data-path='{data}'", "--port", str(port := free_port()),
            "--max-retries", "2", "--max-wait-time", "15"]
    if insecure:
        args.append("--insecure")
    if ca is not None:
        args += ["--root-certificates", str(ca)]
    if key is not None:
        args += ["--auth-supernode-private-key", str(fed["root"] / "keys" / f"{key}.key")]
    return fed["procs"].start(name, *args), port


def _site_runtime(fed, name: str, data: Path) -> Path:
    """`fedlora site` for one site, serving once its socket is there."""
    sock = fed["root"] / name / "site.sock"
    runtime = fed["procs"].start(name, "fedlora", "site", "--data", str(data), "--socket",
                                 str(sock), "--model", FedLoraConfig().model)
    deadline = time.time() + 120
    while not sock.exists():
        assert runtime.poll() is None and time.time() < deadline, fed["procs"].log(name)
        time.sleep(0.2)
    return sock


def test_two_authenticated_sites_train_over_tls(federation):
    """Both sites run `fedlora supernode` (Flower's SuperNode, looking for messages every
    0.2 s). site-a's starts a ClientApp process for every message, which trains; site-b's
    runs each message's ClientApp in its own process (`--in-process`), which forwards it to
    the site's resident runtime (`fedlora site`), SecAgg+ stages included."""
    fed, root = federation, federation["root"]
    ca = root / "certs" / "ca.crt"
    runtime_socket = _site_runtime(fed, "site-b-runtime", root / "site-b.csv")
    supernode = ("fedlora", "supernode", "--poll-interval", "0.2")
    sites = [_supernode(fed, "site-a", "site-a", ca, str(root / "site-a.csv"),
                        command=supernode),
             _supernode(fed, "site-b", "site-b", ca, "",
                        node_config=f"site-runtime='{runtime_socket}'",
                        command=(*supernode, "--in-process"))]
    out = root / "run"
    overrides = (f"eval-data='{root / 'coordinator-test.csv'}' label-column='category' "
                 f"num-rounds=1 learning-rate=0.01 local-steps=12 fraction-evaluate=0 "
                 f"out-dir='{out}'")
    result = subprocess.run([str(BIN / "flwr"), "run", ".", "consortium", "--stream",
                             "--run-config", overrides], cwd=REPO, env=fed["env"],
                            capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # flwr run exits 0 even when the run failed: the run's own summary says how it ended.
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed", summary
    rounds = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rounds] == [0, 1]
    # Round 0: the head solved from both sites' statistics (a message each, through their
    # SuperNodes), already far above chance (0.1); round 1 trains LoRA under it.
    assert rounds[0]["head"]["sites"] == 2 and rounds[0]["head"]["rows"] == 270
    assert rounds[0]["server"]["accuracy"] >= 0.8, rounds
    assert rounds[1]["server"]["accuracy"] >= rounds[0]["server"]["accuracy"] - 0.05, rounds
    assert rounds[1]["server"]["num-examples"] == 100  # the coordinator's whole test set
    assert rounds[1]["clients"]["train-clients-aggregated"] == 2
    # Each site trains on all of its own 150 rows but the 10% it keeps for validation.
    assert rounds[1]["train"]["num-examples"] == 270 and rounds[1]["train"]["train-steps"] == 12
    assert (out / "final_adapter" / "adapter_config.json").is_file()
    assert (out / "checkpoint").is_dir() and (out / "config.json").is_file()

    # The same run under SecAgg+ (the head statistics, then round 1's adapters): its four
    # stages cross the SuperNodes' processes (the mod keeps its keys in the run's context
    # between them), and the sums the server unmasks give the plain run's accuracy. A
    # max-weight near the sites' 135 rows keeps the fixed-point sums precise.
    secure_out = root / "secure-run"
    result = subprocess.run(
        [str(BIN / "flwr"), "run", ".", "consortium", "--stream", "--run-config",
         overrides.replace(str(out), str(secure_out))
         + " secure-aggregation=true secagg-max-weight=300"],
        cwd=REPO, env=fed["env"], capture_output=True, text=True, timeout=480)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert RunDirectory(secure_out).read_summary()["status"] == "completed"
    secure = RunDirectory(secure_out).read_rounds()
    assert secure[0]["head"]["secure"] is True and secure[0]["head"]["sites"] == 2
    assert abs(secure[0]["server"]["accuracy"] - rounds[0]["server"]["accuracy"]) <= 0.01
    assert secure[1]["clients"]["train-clients-aggregated"] == 2
    assert secure[1]["train"]["num-examples"] == 270
    # At most one of the coordinator's 100 test rows apart (0.99 - 1.0 is 0.010000000000000009).
    gap = abs(secure[1]["server"]["accuracy"] - rounds[1]["server"]["accuracy"])
    assert round(gap * 100) <= 1
    # site-b's runtime answered every message of both runs from the model it loaded once; the
    # site's readiness is one line.
    status = subprocess.run([str(BIN / "fedlora"), "site-status", "--socket",
                             str(runtime_socket), "--supernode", f"127.0.0.1:{sites[1][1]}"],
                            cwd=REPO, env=fed["env"], capture_output=True, text=True, timeout=60)
    assert status.returncode == 0 and status.stdout.startswith("site ready:"), status
    assert status.stdout.count("\n") == 1 and "(150 rows)" in status.stdout, status.stdout
    runtime_log = fed["procs"].log("site-b-runtime")
    assert runtime_log.count("answered in") >= 2 + 8, runtime_log[-3000:]  # 4 SecAgg+ stages
    assert "failed in" not in runtime_log, runtime_log[-3000:]
    assert re.search(r"holds \S+ with 135\+15 rows", status.stdout), status.stdout
    # site-a's SuperNode started a ClientApp process for each message; site-b's none.
    assert "Start `flwr-clientapp` process" in fed["procs"].log("site-a")
    assert "flwr-clientapp" not in fed["procs"].log("site-b"), fed["procs"].log("site-b")
    # Stopping a SuperNode frees its port (the fixture checks the SuperLink's).
    fed["procs"].stop([proc for proc, _ in sites])
    not_ready = subprocess.run([str(BIN / "fedlora"), "site-status", "--socket",
                                str(runtime_socket), "--supernode", f"127.0.0.1:{sites[1][1]}"],
                               cwd=REPO, env=fed["env"], capture_output=True, text=True,
                               timeout=60)
    assert not_ready.returncode == 1 and not_ready.stdout.startswith(
        f"site not ready: no SuperNode on 127.0.0.1:{sites[1][1]}"), not_ready
    assert all(_port_free(port) for _, port in sites)


def _refused(fed, name: str, key: str | None, ca: Path | None, insecure: bool = False) -> str:
    """Start a SuperNode that must be turned away; return its log."""
    proc, _ = _supernode(fed, name, key, ca, str(fed["root"] / "site-a.csv"), insecure=insecure)
    try:
        proc.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{name} was not refused: {fed['procs'].log(name)[-2000:]}")
    assert proc.returncode != 0
    return fed["procs"].log(name)


def test_a_site_whose_key_is_not_registered_is_refused(federation):
    log = _refused(federation, "unregistered", "unregistered",
                   federation["root"] / "certs" / "ca.crt")
    assert "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in federation["procs"].log("superlink")


def test_a_plaintext_connection_is_refused(federation):
    log = _refused(federation, "plaintext", None, None, insecure=True)
    assert "could not establish a connection" in log
    # Any plaintext HTTP client gets no answer at all from the TLS port.
    connection = http.client.HTTPConnection("127.0.0.1", federation["port"], timeout=10)
    with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
        connection.request("GET", "/")
        connection.getresponse()


def test_a_certificate_from_another_ca_is_refused(federation):
    log = _refused(federation, "other-ca", "site-a", federation["root"] / "other-ca" / "ca.crt")
    assert "CERTIFICATE_VERIFY_FAILED" in log


def _flwr(env, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_site_holding_ca_crt_cannot_act_as_the_coordinator(federation):
    """Through the sites' port, the Control API (register, unregister, list, submit) and the
    runtime API are refused; the coordinator's own view is unchanged afterwards."""
    import httpx

    fed, env = federation, federation["env"]
    ca = fed["root"] / "certs" / "ca.crt"
    _run(env, "fedlora", "connect", "outsider", "--address", f"127.0.0.1:{fed['port']}",
         "--ca", str(ca))
    nodes_before = json.loads(_flwr(env, "supernode", "list", "consortium", "--format",
                                    "json").stdout)["nodes"]
    runs_before = _flwr(env, "list", "consortium", "--format", "json").stdout
    assert len(nodes_before) == 2

    attempts = {
        "register": ("supernode", "register", str(fed["root"] / "keys" / "unregistered.pub"),
                     "outsider"),
        "unregister": ("supernode", "unregister", str(nodes_before[0]["node-id"]), "outsider"),
        "list nodes": ("supernode", "list", "outsider"),
        "list runs": ("list", "outsider"),
        "submit": ("run", ".", "outsider", "--run-config", "num-rounds=1"),
    }
    for what, args in attempts.items():
        result = _flwr(env, *args)
        output = result.stdout + result.stderr
        assert result.returncode != 0 and "403 Forbidden" in output, (what, output[-1500:])

    # Nothing changed on the coordinator: the same two sites, no new run, and the key the
    # outsider tried to register still cannot connect.
    nodes_after = json.loads(_flwr(env, "supernode", "list", "consortium", "--format",
                                   "json").stdout)["nodes"]
    assert sorted(n["node-id"] for n in nodes_after) == sorted(
        n["node-id"] for n in nodes_before)
    assert _flwr(env, "list", "consortium", "--format", "json").stdout == runs_before
    # The raw APIs too: Control and runtime calls, other methods, escaped paths.
    with httpx.Client(base_url=f"https://127.0.0.1:{fed['port']}", verify=str(ca)) as client:
        for method, path in [("POST", "/v1/control/list-runs"),
                             ("POST", "/v1/runtime/acquire-task"), ("GET", "/docs"),
                             ("GET", "/v1/fleet/get-run"),
                             ("POST", "/v1/fleet/%2e%2e/control/list-runs"),
                             ("POST", "/v1/fleet/../control/list-runs")]:
            assert client.request(method, path).status_code == 403, (method, path)
    assert "refused POST /v1/control/" in fed["procs"].log("gateway")
