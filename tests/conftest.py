"""Shared fixtures: real BANKING77 data read by path, small slices of it, a tiny Llama model."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd
import pytest

# Tests never reach a hub: a hub id must fail fast and offline.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A port no one listens on now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def assert_python_runs(code: str) -> None:
    """Run `code` in a fresh interpreter at the repository root (what it imports is its own)
    and fail with its stderr unless it exits 0."""
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr


@pytest.fixture
def pool_folders_in(tmp_path, monkeypatch):
    """start_ray_during's shared-pool folders, in the test's folder: with Ray stood in for,
    nothing else removes them."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    return tmp_path


class StaticGrid:
    """The part of Flower's Grid that strategies use to sample: a fixed set of node ids."""

    def __init__(self, nodes):
        self.nodes = list(nodes)

    def get_node_ids(self):
        return self.nodes


def recording_grid(cfg, num_nodes: int):
    """An in-process grid that keeps every request with its reply, as they travelled (a
    serialised copy: what a receiver changes afterwards is not seen). It answers in order."""
    from simulations.inprocess import InProcessGrid, over_the_wire

    class RecordingGrid(InProcessGrid):
        def __init__(self):
            super().__init__(cfg, num_nodes)
            self.pairs = []

        def send_and_receive(self, messages, timeout=None):
            messages = list(messages)
            replies = super().send_and_receive(messages, timeout)
            self.pairs.extend(zip(map(over_the_wire, messages), map(over_the_wire, replies)))
            return replies

        @property
        def sent(self):
            return [request for request, _ in self.pairs]

        @property
        def replies(self):
            return [reply for _, reply in self.pairs]

    return RecordingGrid()


def site_message(cfg, labels, state, kind: str = "train", server_round: int = 1,
                 partition: int = 0, num_partitions: int = 3):
    """A message for simulated site `partition`, as a SuperNode hands it to the ClientApp,
    and the site's context: the global adapter `state`, the labels and the round."""
    import json

    from flwr.app import ConfigRecord, Context, Message, RecordDict

    from common.records import adapter_to_record

    context = Context(run_id=1, node_id=10 + partition,
                      node_config={"partition-id": partition, "num-partitions": num_partitions},
                      state=RecordDict(), run_config=cfg.to_run_config())
    msg = Message(RecordDict({"arrays": adapter_to_record(state),
                              "config": ConfigRecord({"labels": json.dumps(labels),
                                                      "server-round": server_round})}),
                  dst_node_id=10 + partition, message_type=kind)
    return msg, context


def simulate_without_ray(monkeypatch, grid=None, patch=None) -> None:
    """`fedlora simulate`/`tune` run the ServerApp in this process on a grid (default: sites
    trained in this process) instead of on Ray, after the same input checks. `patch` replaces
    monkeypatch.setattr where there is no monkeypatch (a script: the builtin setattr)."""
    from server.app import run_federation
    from simulations import runner
    from simulations.inprocess import InProcessGrid

    def simulate(cfg, verbose=False, ray_address=None):
        run_federation(grid or InProcessGrid(cfg, cfg.num_clients), cfg)

    patch = patch or monkeypatch.setattr
    patch(runner, "simulate", simulate)
    patch(runner, "start_ray_during", lambda checks, cfg, ray_address=None: checks())


@pytest.fixture
def task_identity():
    """What Flower's runtime sets before a ServerApp builds messages."""
    from common.flower_compat import set_task_identity

    set_task_identity(run_id=1, task_id=1, node_id=0)


@pytest.fixture(scope="session")
def banking77_dir() -> Path:
    path = Path(os.environ.get("FEDLORA_BANKING77", REPO.parent / "shared/data/banking77"))
    if not (path / "train.csv").is_file():
        pytest.fail(f"BANKING77 not found at {path}: set FEDLORA_BANKING77 to its folder")
    return path


@pytest.fixture(scope="session")
def banking_subset(banking77_dir, tmp_path_factory) -> Path:
    """Ten intents: 30 training and 15 test queries each (a folder with train.csv, test.csv)."""
    out = tmp_path_factory.mktemp("banking_subset")
    train = pd.read_csv(banking77_dir / "train.csv")
    test = pd.read_csv(banking77_dir / "test.csv")
    intents = sorted(train["category"].unique())[:10]
    train[train.category.isin(intents)].groupby("category").head(30).to_csv(
        out / "train.csv", index=False)
    test[test.category.isin(intents)].groupby("category").head(15).to_csv(
        out / "test.csv", index=False)
    return out


@pytest.fixture(scope="session")
def banking_instructions(banking77_dir, tmp_path_factory) -> Path:
    """BANKING77 as prompt/response pairs (query -> intent name) for causal-LM fine-tuning."""
    out = tmp_path_factory.mktemp("banking_sft") / "sft.jsonl"
    frame = pd.read_csv(banking77_dir / "train.csv")
    intents = sorted(frame["category"].unique())[:8]
    frame = frame[frame.category.isin(intents)].groupby("category").head(25)
    pairs = pd.DataFrame({"prompt": "Query: " + frame["text"] + "\nIntent:",
                          "response": " " + frame["category"].str.replace("_", " ")})
    pairs.to_json(out, orient="records", lines=True)
    return out


@pytest.fixture(scope="session")
def tiny_llama_dir(banking77_dir, tmp_path_factory) -> Path:
    """A random-weight Llama-style model (2 layers, width 64) with a word-level tokenizer
    trained on BANKING77's text, saved as a Hugging Face folder."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out = tmp_path_factory.mktemp("tiny_llama")
    frame = pd.read_csv(banking77_dir / "train.csv")
    corpus = list(frame["text"]) + [c.replace("_", " ") for c in frame["category"].unique()]
    corpus += ["Query:", "Intent:"]
    word_level = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator(corpus, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"], min_frequency=2))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>",
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(out)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                         max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    LlamaForCausalLM(config).save_pretrained(out)
    return out


def not_stored_at_first():
    """A pull_object_fn whose object is missing at the first ask and there at the second."""
    import importlib

    unavailable = importlib.import_module(
        "flwr.supercore.inflatable.inflatable_utils").ObjectUnavailableError
    asked = []

    def pull_object(object_id: str) -> bytes:
        asked.append(object_id)
        if len(asked) == 1:
            raise unavailable(object_id)
        return b"bytes"
    return pull_object
