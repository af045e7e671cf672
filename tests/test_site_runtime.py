"""A site's resident runtime (`fedlora site`) and the light ClientApp that forwards to it."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pandas as pd
import pytest
import torch
from flwr.app import Context, Message, RecordDict

import client.app as client_app
from client import site_link
from client.entry import app as entry_app
from client.entry import forward, handle
from client.site_runtime import SiteRuntime
from common.config import FedLoraConfig
from common.data import load_splits, resolve_labels
from common.errors import FedLoraError
from common.flower_compat import set_task_identity
from common.model import build_lora_model
from common.packed_records import is_packed, pack, unpack
from common.records import record_to_adapter
from tests.conftest import REPO, assert_python_runs, site_message

TIMING = ("train-seconds", "train-started-at", "eval-seconds", "train-cpu-seconds",
          "eval-cpu-seconds")


@pytest.fixture
def site(banking_subset, tmp_path):
    """A deployed site's run: its data file, the run's config, labels and global adapter."""
    set_task_identity(run_id=1, task_id=1, node_id=0)
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", local_steps=2)
    labels = resolve_labels(cfg, load_splits(cfg))
    state = build_lora_model(cfg, labels).trainable_state()
    return cfg, labels, state, banking_subset / "train.csv", tmp_path / "site" / "site.sock"


def _message(cfg, labels, state, node_config, kind="train"):
    msg, context = site_message(cfg, labels, state, kind)
    return msg, Context(run_id=context.run_id, node_id=context.node_id, node_config=node_config,
                        state=RecordDict(), run_config=context.run_config)


def _start_runtime(cfg, data, sock, extra=()) -> subprocess.Popen:
    """`fedlora site` in its own process, once it listens."""
    process = subprocess.Popen(
        [sys.executable, "-m", "simulations.cli", "site", "--data", str(data), "--socket",
         str(sock), "--model", cfg.model, *extra], cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not site_link_answers(sock):
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return process


def site_link_answers(sock) -> bool:
    try:
        site_link.request_status(sock)
        return True
    except FedLoraError:
        return False


@pytest.fixture
def runtime_process(site):
    """`fedlora site` in its own process; stopped (SIGTERM) at the end."""
    cfg, _, _, data, sock = site
    process = _start_runtime(cfg, data, sock)
    yield process, sock
    process.send_signal(signal.SIGTERM)
    process.wait(timeout=60)


def test_the_clientapp_that_forwards_imports_neither_torch_nor_transformers():
    assert_python_runs("import sys\n"
                       "import client.entry\n"
                       "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]\n"
                       "assert not heavy, heavy\n")


def test_the_runtime_replies_as_the_clientapp_in_process_bit_for_bit(site, runtime_process,
                                                                     monkeypatch):
    cfg, labels, state, data, _ = site
    process, sock = runtime_process
    monkeypatch.setattr(client_app, "_CACHE", None)
    for kind in ("train", "evaluate", "train"):
        local = handle(*_message(cfg, labels, state, {"data-path": str(data)}, kind))
        # The runtime's message comes packed, as the server's PackedGrid sends it: the
        # forwarding ClientApp unpacks it, and packs the runtime's reply the same way.
        msg, context = _message(cfg, labels, state, {site_link.RUNTIME_KEY: str(sock)}, kind)
        msg.content = pack(msg.content)
        assert len(msg.content["arrays"]) == 1
        remote = handle(msg, context)
        assert not remote.has_error(), remote.error
        if kind == "train":
            assert is_packed(remote.content) and len(remote.content["arrays"]) == 1
        remote.content = unpack(remote.content)
        local_metrics = dict(local.content["metrics"])
        remote_metrics = dict(remote.content["metrics"])
        assert {k: v for k, v in remote_metrics.items() if k not in TIMING} == \
            {k: v for k, v in local_metrics.items() if k not in TIMING}
        if kind == "train":
            ours, theirs = (record_to_adapter(r.content["arrays"]) for r in (local, remote))
            assert list(ours) == list(theirs)
            assert all(torch.equal(ours[n], theirs[n]) for n in ours)
    # A run asking for another model is refused by name, and the runtime goes on serving.
    other = cfg.replace(model=str(REPO / "no-such-model"))
    refused = handle(*_message(other, labels, state, {site_link.RUNTIME_KEY: str(sock)}))
    assert refused.has_error() and "this site's runtime serves model" in refused.error.reason
    again = handle(*_message(cfg, labels, state, {site_link.RUNTIME_KEY: str(sock)},
                             "evaluate"))
    assert not again.has_error()
    assert process.poll() is None


def test_a_runtime_killed_mid_message_fails_that_message_and_a_restarted_one_serves(
        site, runtime_process):
    """SIGKILL while a train message runs: the ClientApp's reply is an error (the server
    leaves the site out of that round); a runtime started again on the same socket path
    answers the next message as the first one would have been answered."""
    cfg, labels, state, data, _ = site
    process, sock = runtime_process
    slow = cfg.replace(local_steps=400)  # long enough to be killed in the middle
    msg, context = _message(slow, labels, state, {site_link.RUNTIME_KEY: str(sock)})
    killer = threading.Timer(8.0, process.kill)
    killer.start()
    with pytest.raises(FedLoraError, match="closed the connection|broke off"):
        forward(sock, msg, context)
    killer.join()
    assert process.wait(timeout=30) == -signal.SIGKILL and sock.exists()  # a stale socket
    with pytest.raises(FedLoraError, match="does not answer"):
        forward(sock, *_message(cfg, labels, state, {}))
    restarted = _start_runtime(cfg, data, sock)
    try:
        reply = handle(*_message(cfg, labels, state, {site_link.RUNTIME_KEY: str(sock)}))
        assert not reply.has_error(), reply.error
        assert reply.content["metrics"]["num-examples"] > 0
        assert site_link.request_status(sock)["resident"][0]["train-rows"] == \
            reply.content["metrics"]["num-examples"]
    finally:
        restarted.send_signal(signal.SIGTERM)
        restarted.wait(timeout=60)


@pytest.fixture
def runtime_thread(site):
    cfg, _, _, data, sock = site
    runtime = SiteRuntime(sock, data, model=cfg.model)
    runtime.bind()
    thread = threading.Thread(target=runtime.serve_forever, daemon=True)
    thread.start()
    yield runtime
    runtime.stop()
    thread.join(10)
    assert not sock.exists()  # the runtime removes its socket on the way out


def test_only_the_sites_own_user_reaches_the_runtime(site, runtime_thread, monkeypatch):
    cfg, labels, state, _, sock = site
    assert oct(sock.stat().st_mode & 0o777) == "0o600"
    assert oct(sock.parent.stat().st_mode & 0o777) == "0o700"
    msg, context = _message(cfg, labels, state, {})
    os.chmod(sock, 0o666)
    with pytest.raises(FedLoraError, match="has mode 0666; others could open it"):
        forward(sock, msg, context)
    os.chmod(sock, 0o600)
    # A peer of another user (as the kernel reports it) gets no answer at all.
    monkeypatch.setattr("client.site_runtime.peer_uid", lambda conn: os.getuid() + 1)
    with pytest.raises(FedLoraError, match="closed the connection|broke off"):
        forward(sock, msg, context)
    assert runtime_thread.answered == 0


def test_malformed_requests_get_an_error_and_the_runtime_keeps_serving(site, runtime_thread):
    cfg, labels, state, _, sock = site
    with socket.socket(socket.AF_UNIX) as raw:  # not the framing at all
        raw.connect(str(sock))
        raw.sendall(b"GET / HTTP/1.1\r\n\r\n" + b"x" * 64)
        raw.shutdown(socket.SHUT_WR)
        reply, reason = site_link.recv_frames(raw, 2)
    assert reply == b"" and b"malformed request: not a fedlora site-runtime frame" in reason
    with socket.socket(socket.AF_UNIX) as raw:  # frames, but no Flower message in them
        raw.connect(str(sock))
        site_link.send_frames(raw, [b"\xff\x00garbage", b"\x01"])
        reply, reason = site_link.recv_frames(raw, 2)
    assert reply == b"" and b"not a Flower message and context" in reason
    msg, context = _message(cfg, labels, state, {site_link.RUNTIME_KEY: str(sock)}, "evaluate")
    answer = handle(msg, context)
    assert not answer.has_error() and answer.content["metrics"]["num-examples"] > 0
    assert runtime_thread.answered == 1


def _site_command(*args):
    return subprocess.run([sys.executable, "-m", "simulations.cli", "site", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120)


def test_bad_runtime_input_is_one_line(site, runtime_thread, tmp_path):
    _, _, _, data, sock = site
    missing = _site_command("--data", str(tmp_path / "none.csv"), "--socket",
                            str(tmp_path / "a.sock"))
    busy = _site_command("--data", str(data), "--socket", str(sock))
    bad_key = _site_command("--data", str(data), "--socket", str(tmp_path / "b.sock"),
                            "--node-config", "lora_rank=4")
    for result, says in ((missing, "none.csv' does not exist"), (busy, "another runtime is "
                         "listening on"), (bad_key, "unknown node-config key 'lora_rank'")):
        assert result.returncode == 2
        assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    with pytest.raises(FedLoraError, match="no site runtime at .*start it with `fedlora site`"):
        forward(tmp_path / "gone.sock", *_message(*site[:3], {}))


def test_a_new_run_of_the_same_site_config_keeps_the_loaded_model(monkeypatch):
    """A runtime serves run after run: another out-dir, more rounds or a resume keep its
    process cache (model, tokenised rows); a key a site loads by (max-length) starts over."""
    monkeypatch.setattr(client_app, "_CACHE", None)
    first = FedLoraConfig(out_dir="runs/a", num_rounds=3)
    cache = client_app._process_cache(first, ["a", "b"])
    again = first.replace(out_dir="runs/b", num_rounds=10, resume=True, round_timeout=60.0)
    assert client_app._process_cache(again, ["a", "b"]) is cache
    assert client_app._process_cache(first.replace(max_length=64), ["a", "b"]) is not cache


# -- every feature through the runtime ----------------------------------------------------
RUNTIME_NODE, PLAIN_NODE = 1000, 1001
FEATURES = {  # name: (run config changes, the runtime site's own node-config)
    "dp-sgd": ({"dp_noise_multiplier": 1.0}, ""),
    "client-level-dp": ({"client_dp_noise_multiplier": 0.5}, ""),
    "int8-transfer": ({"transfer_dtype": "int8"}, ""),
    "mixed-ranks-exact": ({"strategy": "exact"}, "lora-r=2"),
    "ffa": ({"strategy": "ffa"}, ""),
}


@pytest.fixture(scope="module")
def deployed_sites(banking_subset, tmp_path_factory):
    """Two deployed sites' own data files (the subset's training rows split in two)."""
    folder = tmp_path_factory.mktemp("deployed")
    rows = pd.read_csv(banking_subset / "train.csv").sample(frac=1.0, random_state=0)
    files = folder / "site-a.csv", folder / "site-b.csv"
    rows.iloc[::2].to_csv(files[0], index=False)
    rows.iloc[1::2].to_csv(files[1], index=False)
    return files


@pytest.fixture(scope="module")
def runtimes(deployed_sites, tiny_llama_dir, tmp_path_factory):
    """`fedlora site` for site a, one per node-config the features need, started once."""
    started = {}

    def runtime(node_config: str):
        if node_config not in started:
            sock = tmp_path_factory.mktemp("rt") / "site.sock"
            cfg = FedLoraConfig(model=str(tiny_llama_dir))
            extra = ["--node-config", node_config] if node_config else []
            started[node_config] = _start_runtime(cfg, deployed_sites[0], sock, extra), sock
        return started[node_config][1]

    yield runtime
    for process, _ in started.values():
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)


def _same_reply(kind: str, remote: Message, local: Message, exact: bool) -> None:
    """The runtime's reply against the in-process handlers' for one message."""
    assert remote.has_error() == local.has_error() is False, (remote.error, local.error)
    assert list(remote.content) == list(local.content), kind
    ours, theirs = (dict(r.content["metrics"]) for r in (local, remote))
    if exact:
        assert {k: v for k, v in theirs.items() if k not in TIMING} == \
            {k: v for k, v in ours.items() if k not in TIMING}, kind
    else:  # the site's DP noise comes from the OS, never from the run's seed
        assert theirs.keys() == ours.keys() and theirs["num-examples"] == ours["num-examples"]
        assert theirs.get("dp-epsilon") == ours.get("dp-epsilon")
    if "arrays" in local.content:
        mine, yours = local.content["arrays"], remote.content["arrays"]
        assert list(mine) == list(yours), kind
        for name in mine:
            assert mine[name].dtype == yours[name].dtype and mine[name].shape == yours[name].shape
            if exact:
                assert mine[name].data == yours[name].data, (kind, name)


@pytest.mark.parametrize("feature", list(FEATURES))
def test_every_feature_trains_through_the_runtime_as_it_does_in_process(
        feature, banking_subset, tiny_llama_dir, deployed_sites, runtimes, tmp_path,
        task_identity, monkeypatch):
    """A federation of two deployed sites, one behind its runtime, one round. Every message to
    the runtime's site is also answered by the in-process handlers on the same data (their
    context kept apart), and the two replies must agree: bit for bit, or under DP-SGD in all
    but the site's noise. The server aggregates both sites' replies."""
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid, over_the_wire

    changes, node_config = FEATURES[feature]
    cfg = FedLoraConfig(
        data=str(banking_subset), model=str(tiny_llama_dir), label_column="category", lora_r=4,
        local_steps=2, num_rounds=1, min_train_clients=2, min_evaluate_clients=2,
        min_available_clients=2, max_eval_examples=30, round_retries=0,
        out_dir=str(tmp_path / "run"), **changes)
    sock = runtimes(node_config)
    own = {**({"lora-r": 2} if node_config else {}), "data-path": str(deployed_sites[0])}
    monkeypatch.setattr(client_app, "_CACHE", None)
    grid = InProcessGrid(cfg, 2, app=lambda message, context: answer(message, context),
                         first_node_id=RUNTIME_NODE)
    config = {RUNTIME_NODE: {site_link.RUNTIME_KEY: str(sock)},
              PLAIN_NODE: {"data-path": str(deployed_sites[1])}}
    for node, context in grid.contexts.items():
        context.node_config = config[node]
    in_process = Context(run_id=1, node_id=RUNTIME_NODE, node_config=own, state=RecordDict(),
                         run_config=cfg.to_run_config())
    replies = []

    def answer(message: Message, context: Context) -> Message:
        if context.node_id == PLAIN_NODE:
            return client_app.app(message=message, context=context)
        remote = entry_app(message=over_the_wire(message), context=context)
        local = client_app.app(message=over_the_wire(message), context=in_process)
        _same_reply(message.metadata.message_type, remote, local,
                    exact="dp_noise_multiplier" not in changes)
        replies.append((message, remote))
        return remote

    run = run_federation(grid, cfg)
    assert json.loads((run.path / "summary.json").read_text())["status"] == "completed"
    assert run.read_rounds()[1]["clients"]["train-clients-aggregated"] == 2
    kinds = [m.metadata.message_type for m, _ in replies]
    assert "train" in kinds and "evaluate" in kinds, kinds
    trained = next(r for m, r in replies if m.metadata.message_type == "train"
                   and "arrays" in r.content)
    sent = next(m for m, _ in replies if m.metadata.message_type == "train")
    arrays = trained.content["arrays"]
    if feature == "dp-sgd":
        assert trained.content["metrics"]["dp-epsilon"] > 0
    if feature == "client-level-dp":  # Flower's clipping mod ran in the runtime
        update = record_to_adapter(arrays)
        start = record_to_adapter(sent.content["arrays"])
        norm = sum(float((update[n] - start[n]).double().pow(2).sum()) for n in update) ** 0.5
        assert 0 < norm <= cfg.client_dp_clip_norm * (1 + 1e-5)
    if feature == "int8-transfer":
        assert {a.dtype for name, a in arrays.items() if "lora_" in name} == {"int8"}
    if feature == "mixed-ranks-exact":
        ranks = {a.shape[0] for name, a in arrays.items() if "lora_A" in name}
        assert ranks == {2}
    if feature == "ffa":  # A stays frozen at its seeded start and is never sent; B trained
        start = record_to_adapter(sent.content["arrays"])
        update = record_to_adapter(arrays)
        assert not [n for n in update if "lora_A" in n]
        trained_b = [n for n in update if "lora_B" in n]
        assert trained_b and not all(torch.equal(update[n], start[n]) for n in trained_b)
    assert site_link.request_status(sock)["resident"][0]["train-rows"] == \
        trained.content["metrics"]["num-examples"]
