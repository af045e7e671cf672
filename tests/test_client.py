"""The ClientApp's handlers, called in-process as a SuperNode would call them."""


import pytest
import torch

import client.app as client_app
from common.config import FedLoraConfig
from common.data import load_splits, resolve_labels
from common.errors import FedLoraError
from common.flower_compat import set_task_identity
from common.model import build_lora_model
from common.records import record_to_adapter
from tests.conftest import site_message


@pytest.fixture
def site(banking_subset, monkeypatch):
    set_task_identity(run_id=1, task_id=1, node_id=0)
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=3,
                        local_steps=2)
    labels = resolve_labels(cfg, load_splits(cfg))
    global_state = build_lora_model(cfg, labels).trainable_state()
    builds = []
    real_build = client_app.build_lora_model
    monkeypatch.setattr(client_app, "build_lora_model",
                        lambda *a, **k: builds.append(1) or real_build(*a, **k))
    monkeypatch.setattr(client_app, "_CACHE", None)

    def message(kind, server_round=1, state=None, partition=0):
        return site_message(cfg, labels, state or global_state, kind, server_round, partition)

    return message, global_state, builds


def test_train_replies_with_an_updated_adapter_and_its_example_count(site):
    message, global_state, builds = site
    reply = client_app.train(*message("train"))
    metrics = reply.content["metrics"]
    assert metrics["num-examples"] == 90  # 300 / 3 sites, 10% kept for validation
    assert metrics["train-steps"] == 2 and metrics["train-loss"] > 0
    update = record_to_adapter(reply.content["arrays"])
    assert list(update) == list(global_state)
    assert any(not torch.equal(update[n], global_state[n]) for n in update)


def test_model_and_data_are_loaded_once_per_process(site, monkeypatch):
    message, _, builds = site
    tokenized = []
    real_tokenize = client_app.tokenize
    monkeypatch.setattr(client_app, "tokenize",
                        lambda *a, **k: tokenized.append(1) or real_tokenize(*a, **k))
    for server_round in (1, 2, 3):
        for partition in (0, 1):
            client_app.train(*message("train", server_round, partition=partition))
            client_app.evaluate(*message("evaluate", server_round, partition=partition))
    assert len(builds) == 1
    assert len(tokenized) == 2 * 2  # train and validation split, once per site


def test_evaluate_reports_validation_metrics(site):
    message, _, _ = site
    metrics = client_app.evaluate(*message("evaluate")).content["metrics"]
    assert metrics["num-examples"] == 10
    assert 0 <= metrics["eval-accuracy"] <= 1 and metrics["eval-loss"] > 0


def test_an_adapter_of_the_wrong_shape_is_refused(site):
    message, global_state, _ = site
    wrong = {n: (t[:, :4] if t.dim() == 2 else t) for n, t in global_state.items()}
    with pytest.raises(FedLoraError, match="adapter from the server: tensor .* has shape"):
        client_app.train(*message("train", state=wrong))
