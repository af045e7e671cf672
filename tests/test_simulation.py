"""End to end: the real `fedlora simulate` and `flwr run .` on real data, then the outputs."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common.config import FedLoraConfig
from common.data import load_splits, tokenize
from common.metrics import evaluate_examples
from server.outputs import RunDirectory
from tests.conftest import REPO, free_port

BIN = Path(sys.executable).parent


def _simulate(*args: str, timeout: int = 420) -> subprocess.CompletedProcess:
    result = subprocess.run([str(BIN / "fedlora"), "simulate", *args], cwd=REPO,
                            capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def classification_run(banking_subset, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cls") / "run"
    _simulate("--num-clients", "3", "--rounds", "2", "--data", str(banking_subset), "--out",
              str(out), "--run-config", "label-column=category local-epochs=2 learning-rate=0.005")
    return out


def test_the_head_round_reaches_every_site_and_every_round_is_recorded(classification_run):
    rounds = RunDirectory(classification_run).read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    first, last = rounds[0]["server"], rounds[-1]["server"]
    # The head solved from the three Ray-simulated sites' statistics, before any LoRA round:
    # far above chance (0.1), and training under it keeps it.
    assert rounds[0]["head"]["sites"] == 3 and rounds[0]["head"]["rows"] == 270
    assert first["accuracy"] >= 0.8 and last["accuracy"] >= first["accuracy"] - 0.05
    assert rounds[0]["bytes-up"] == rounds[0]["head"]["bytes-up"] > 0
    assert 0 < last["macro-f1"] <= 1 and last["num-examples"] == 150
    for r in rounds[1:]:
        assert r["train"]["num-examples"] == 270 and r["train"]["train-loss"] > 0
        assert 0 <= r["evaluate"]["eval-accuracy"] <= 1 and r["evaluate"]["num-examples"] == 30
        assert r["clients"]["train-clients-aggregated"] == 3
        # LoRA (6 layers x query,value x A,B: 73,728) + a 10-intent head (3,850), float32, plus
        # per tensor its name and a header, plus the message's metrics or config; 3 clients
        # receive it twice (train, evaluate) and send back the LoRA factors (the fitted head
        # is the server's already).
        adapter_bytes, lora_bytes, overhead = 4 * (73_728 + 3_850), 4 * 73_728, 26 * 256 + 1024
        assert 3 * lora_bytes < r["bytes-up"] < 3 * (lora_bytes + overhead)
        assert 6 * adapter_bytes < r["bytes-down"] < 6 * (adapter_bytes + overhead)
        assert r["seconds"] > 0
        # CPU seconds are the work's own (bench/overhead.py's ideal time adds them up): a
        # delta over the call, not the process's total since it started, and one torch thread
        # a site (client-num-cpus 1).
        for site in r["train-per-client"]:
            assert 0 < site["train-cpu-seconds"] <= 1.2 * site["train-seconds"] + 0.3, site
        for site in r["evaluate-per-client"]:
            assert 0 < site["eval-cpu-seconds"] <= 1.2 * site["eval-seconds"] + 0.3, site
        assert r["server"]["eval-cpu-seconds"] > 0
    summary = json.loads((classification_run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final"] == last
    saved = json.loads((classification_run / "config.json").read_text())
    assert FedLoraConfig.from_run_config(saved).num_rounds == 2


def test_final_adapter_reloads_with_peft_and_reproduces_the_accuracy(classification_run):
    """PEFT loads the adapter onto the base its fedlora.json names: the default model's head
    reads mean-pooled features (common/mean_pooling.py)."""
    from peft import PeftModel
    from transformers import AutoTokenizer

    from common.model import load_base_model

    adapter = classification_run / "final_adapter"
    labels = json.loads((adapter / "labels.json").read_text())
    saved = json.loads((classification_run / "config.json").read_text())
    cfg = FedLoraConfig.from_run_config(saved)
    base_path = json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"]
    pooling = json.loads((adapter / "fedlora.json").read_text())["pooling"]
    assert pooling == "mean"
    model = PeftModel.from_pretrained(load_base_model(base_path, labels, pooling), adapter)
    tokenizer = AutoTokenizer.from_pretrained(adapter)
    examples = tokenize(load_splits(cfg).test, tokenizer, cfg, labels)
    metrics = evaluate_examples(model, examples, batch_size=64, pad_id=tokenizer.pad_token_id,
                                device=torch.device("cpu"), classification=True)
    server = RunDirectory(classification_run).read_rounds()[-1]["server"]
    assert metrics["accuracy"] == server["accuracy"]
    assert metrics["loss"] == pytest.approx(server["loss"], abs=1e-4)


def test_causal_lm_federation_lowers_the_server_loss(banking_instructions, tiny_llama_dir,
                                                      tmp_path):
    out = tmp_path / "run"
    _simulate("--num-clients", "3", "--rounds", "2", "--data", str(banking_instructions),
              "--model", str(tiny_llama_dir), "--task", "causal-lm", "--out", str(out),
              "--run-config", "learning-rate=0.01 local-epochs=2 batch-size=16 "
                              "prompt-template='{prompt}'")
    rounds = RunDirectory(out).read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    assert rounds[2]["server"]["loss"] < rounds[0]["server"]["loss"] - 0.1
    assert rounds[2]["server"]["perplexity"] < rounds[0]["server"]["perplexity"]
    assert (out / "final_adapter" / "adapter_model.safetensors").is_file()


def _stop_processes_under(marker: str) -> None:
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        if any(marker in part for part in (proc.info["cmdline"] or [])):
            proc.kill()


def test_flwr_run_runs_the_same_apps(banking_subset, tmp_path):
    """`flwr run .` on a private local SuperLink (own FLWR_HOME and ports), stopped after."""
    home = tmp_path / "flwr_home"
    ports = [free_port(), free_port()]
    env = dict(os.environ, FLWR_HOME=str(home), PATH=f"{BIN}{os.pathsep}{os.environ['PATH']}",
               FLWR_LOCAL_SUPERLINK_HTTP_API_PORT=str(ports[0]),
               FLWR_LOCAL_CONTROL_API_PORT=str(ports[1]),
               FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1")
    out = tmp_path / "run"
    overrides = (f"data='{banking_subset}' label-column='category' num-rounds=1 "
                 f"learning-rate=0.005 local-epochs=2 out-dir='{out}'")
    try:
        result = subprocess.run([str(BIN / "flwr"), "run", ".", "--stream", "--run-config",
                                 overrides], cwd=REPO, env=env, capture_output=True, text=True,
                                timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        # flwr run exits 0 even when the run failed: the run's own summary says how it ended.
        summary = json.loads((out / "summary.json").read_text())
        assert summary["status"] == "completed", summary
        rounds = RunDirectory(out).read_rounds()
        assert [r["round"] for r in rounds] == [0, 1]
        assert rounds[0]["head"]["sites"] == 2  # flwr's 2 SuperNodes sent head statistics
        assert rounds[0]["server"]["accuracy"] >= 0.8
        assert rounds[1]["server"]["accuracy"] >= rounds[0]["server"]["accuracy"] - 0.05
        assert rounds[1]["clients"]["train-clients-aggregated"] == 2
    finally:
        _stop_processes_under(str(home))
    # Nothing is left listening (TIME_WAIT remnants are fine: servers bind with SO_REUSEADDR).
    deadline = time.time() + 15
    for port in ports:
        while True:
            with socket.socket() as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                try:
                    s.bind(("127.0.0.1", port))
                    break
                except OSError:
                    assert time.time() < deadline, f"port {port} still in use"
                    time.sleep(0.5)
    shutil.rmtree(home, ignore_errors=True)


STRATEGY_RUNS = {
    "fedavg": "", "fedprox": "proximal-mu=0.1 transfer-dtype=int8", "fedadam": "",
    "fedyogi": "", "fedavgm": "",
    "ffa": "", "exact": "client-ranks='2,4,4' global-rank=4", "hetlora": "client-ranks='2,4,4'",
    "median": "", "trimmed-mean": "trim-fraction=0.34",
}


@pytest.mark.parametrize("strategy", list(STRATEGY_RUNS))
def test_every_strategy_runs_end_to_end(strategy, banking_subset, tiny_llama_dir, tmp_path,
                                        task_identity):
    """A 2-round federation per strategy (tiny Llama classifier): the real ServerApp loop and
    ClientApp over Flower messages, in this process (InProcessGrid; the Ray transport is
    exercised by the other tests here), then the exported adapter reloaded with peft reproduces
    the server's last accuracy."""
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from common.config import parse_overrides
    from server.app import run_federation
    from simulations.inprocess import InProcessGrid

    out = tmp_path / "run"
    sites = 3
    run_cfg = FedLoraConfig.from_run_config({
        "data": str(banking_subset), "model": str(tiny_llama_dir), "strategy": strategy,
        "num-clients": sites, "num-rounds": 2, "out-dir": str(out),
        **parse_overrides(f"label-column=category lora-r=4 local-steps=3 max-eval-examples=60 "
                          f"{STRATEGY_RUNS[strategy]}")})
    run_federation(InProcessGrid(run_cfg, sites), run_cfg)
    rounds = RunDirectory(out).read_rounds()
    assert [r["round"] for r in rounds] == [0, 1, 2]
    for r in rounds[1:]:
        assert r["clients"]["train-clients-aggregated"] == sites
        assert r["bytes-up-per-client"] > 0 and r["bytes-down-per-client"] > 0
        if strategy in ("exact", "ffa"):
            assert r["agg-rel-error"] < 1e-5
        elif strategy in ("fedavg", "hetlora"):
            assert r["agg-rel-error"] > 1e-3
    cfg = FedLoraConfig.from_run_config(json.loads((out / "config.json").read_text()))
    labels = json.loads((out / "labels.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(out / "final_adapter")
    base = AutoModelForSequenceClassification.from_pretrained(
        tiny_llama_dir, num_labels=len(labels), pad_token_id=tokenizer.pad_token_id)
    model = PeftModel.from_pretrained(base, out / "final_adapter")
    examples = tokenize(load_splits(cfg).test, tokenizer, cfg, labels)
    metrics = evaluate_examples(model, examples, batch_size=64, pad_id=tokenizer.pad_token_id,
                                device=torch.device("cpu"), classification=True)
    assert metrics["accuracy"] == rounds[-1]["server"]["accuracy"]
    assert metrics["loss"] == pytest.approx(rounds[-1]["server"]["loss"], abs=1e-4)

