"""Clients that raise, reply with nothing, or answer too late are left out of their round;
a round without enough usable replies stops the run cleanly, and it resumes from there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from server.outputs import RunDirectory
from tests.conftest import REPO

BIN = Path(sys.executable).parent


def _simulate(data, model, out, faults, *extra):
    env = dict(os.environ, FEDLORA_INJECT_FAULTS=faults)
    return subprocess.run(
        [str(BIN / "fedlora"), "simulate", "--num-clients", "3", "--data", str(data),
         "--model", str(model), "--out", str(out), *extra], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=600)


CONFIG = "label-column=category lora-r=4 local-steps=2 max-eval-examples=60 fraction-evaluate=0"


def test_failing_clients_are_left_out_and_the_run_goes_on(banking_subset, tiny_llama_dir,
                                                          tmp_path):
    out = tmp_path / "run"
    result = _simulate(banking_subset, tiny_llama_dir, out, "0:raise@1,1:empty@2,2:sleep=45@3",
                       "--rounds", "3", "--run-config", f"{CONFIG} round-timeout=30")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    rounds = RunDirectory(out).read_rounds()
    for r, counter, reason in ((1, "train-rejected", "injected fault"),
                               (2, "train-rejected", "expected one MetricRecord"),
                               (3, "train-missing", "no reply within round-timeout")):
        assert rounds[r]["clients"]["train-clients-aggregated"] == 2
        assert rounds[r]["clients"][counter] == 1
        [dropped] = rounds[r]["dropped"]
        assert reason in dropped["reason"] and isinstance(dropped["node"], int)


def test_too_few_replies_stop_the_run_cleanly_and_it_resumes(banking_subset, tiny_llama_dir,
                                                              tmp_path):
    out = tmp_path / "run"
    result = _simulate(banking_subset, tiny_llama_dir, out, "0:raise@2,1:raise@2",
                       "--rounds", "2", "--run-config", CONFIG)
    assert result.returncode == 1
    [line] = [x for x in result.stderr.splitlines() if x.startswith("fedlora: error:")]
    assert "round 2: only 1 usable training replies, at least 2 needed, after 2 attempts" in line
    assert [r["round"] for r in RunDirectory(out).read_rounds()] == [0, 1]
    assert json.loads((out / "checkpoint" / "state.json").read_text())["round"] == 1
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"

    resumed = _simulate(banking_subset, tiny_llama_dir, out, "", "--resume", str(out))
    assert resumed.returncode == 0, resumed.stdout[-2000:] + resumed.stderr[-2000:]
    assert [r["round"] for r in RunDirectory(out).read_rounds()] == [0, 1, 2]
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


def test_a_site_the_superlink_reports_unavailable_is_left_out_once_by_its_own_id(
        banking_subset, tiny_llama_dir, tmp_path, task_identity):
    """A SuperNode that dies mid-round stops heart-beating; the SuperLink then answers its
    request itself (sender: the SuperLink, reply_to: the request). The round leaves out that
    site, by its own node id, once, with Flower's reason, and aggregates the others."""
    from flwr.app import Error, Message

    from common.config import FedLoraConfig
    from common.flower_compat import ProtoMessage, message_from_proto, message_to_proto
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    class SuperLinkGrid(InProcessGrid):
        dead = 1001

        def _handle(self, msg):
            if msg.metadata.dst_node_id != self.dead:
                return super()._handle(msg)
            reply = message_to_proto(Message(Error(code=5, reason="Error: Node Unavailable"),
                                             reply_to=msg))
            reply.metadata.src_node_id = 1  # Flower's SUPERLINK_NODE_ID
            return message_from_proto(ProtoMessage.FromString(reply.SerializeToString()))

    cfg = FedLoraConfig(data=str(banking_subset), model=str(tiny_llama_dir),
                        label_column="category", lora_r=4, local_steps=2, num_clients=3,
                        min_available_clients=3, num_rounds=1, fraction_evaluate=0,
                        max_eval_examples=30, round_retries=0, out_dir=str(tmp_path / "run"))
    run = run_federation(SuperLinkGrid(cfg, 3), cfg)
    round_1 = run.read_rounds()[1]
    assert round_1["dropped"] == [{"node": SuperLinkGrid.dead,
                                   "reason": "client failed: Error: Node Unavailable"}]
    assert round_1["clients"]["train-clients-aggregated"] == 2
    assert "train-missing" not in round_1["clients"]
    assert sorted(c["node"] for c in round_1["train-per-client"]) == [1000, 1002]
