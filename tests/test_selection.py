"""Best-round selection, early stopping and class-weighted loss: the rules by hand, then a real
federation whose best_adapter scores what metrics.jsonl says its round scored."""

from __future__ import annotations

import json

import pytest
import torch

from client.training import batch_loss, class_weights
from common.adapters import read_saved_adapter
from common.config import FedLoraConfig
from common.errors import FedLoraError
from server.app import run_federation
from server.evaluation import evaluate_saved_adapter
from server.selection import best_round, improves, should_stop
from simulations.inprocess import InProcessGrid

pytestmark = pytest.mark.usefixtures("task_identity")


def test_improvement_follows_the_metrics_direction_and_min_delta():
    assert improves(0.50, 0.40, "accuracy", 0.05) and not improves(0.44, 0.40, "accuracy", 0.05)
    assert improves(1.0, 1.2, "loss", 0.1) and not improves(1.15, 1.2, "loss", 0.1)
    assert improves(3.0, None, "perplexity", 0.0) and not improves(float("nan"), None, "loss", 0)
    rounds = [(0, 0.10), (1, 0.30), (2, 0.32), (3, 0.29), (4, 0.45)]
    assert best_round(rounds, "accuracy", 0.0) == (4, 0.45)
    assert best_round(rounds[:4], "accuracy", 0.05) == (1, 0.30)  # 0.32 is not 0.05 better
    assert best_round([(0, 2.0), (1, 1.5), (2, 1.7)], "loss", 0.0) == (1, 1.5)


def test_patience_counts_rounds_since_the_best():
    assert not should_stop(3, 1, patience=0)
    assert not should_stop(2, 1, patience=2)
    assert should_stop(3, 1, patience=2)


def test_selection_metric_must_be_measured_for_the_task():
    assert FedLoraConfig(task="causal-lm").selection_key == "loss"
    assert FedLoraConfig().selection_key == "accuracy"
    with pytest.raises(FedLoraError, match="selection-metric accuracy is not measured for task"):
        FedLoraConfig(task="causal-lm", selection_metric="accuracy")
    with pytest.raises(FedLoraError, match="class-weighted-loss is not available with DP-SGD"):
        FedLoraConfig(class_weighted_loss=True, dp_noise_multiplier=1.0)


def test_class_weights_and_the_weighted_loss_match_a_hand_computation():
    examples = [{"labels": label} for label in [0, 0, 0, 1, 2, 2]]
    weights = class_weights(examples, num_labels=4)
    # n / (classes present x count): 6/(3*3), 6/(3*1), 6/(3*2); class 3 absent -> 1.
    assert torch.allclose(weights, torch.tensor([2 / 3, 2.0, 1.0, 1.0]))

    class Head(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.logits = torch.tensor([[2.0, 0.5, -1.0, 0.0], [0.1, 1.0, 0.3, 0.0],
                                        [0.0, 0.0, 3.0, 0.0]])

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.logits})()

    batch = {"input_ids": torch.zeros(3, 2, dtype=torch.long),
             "attention_mask": torch.ones(3, 2, dtype=torch.long),
             "labels": torch.tensor([0, 1, 2])}
    losses = -torch.log_softmax(Head().logits, dim=-1)[torch.arange(3), batch["labels"]]
    w = weights[batch["labels"]]
    expected = (w * losses).sum() / w.sum()
    assert batch_loss(Head(), batch, weights).item() == pytest.approx(expected.item(), rel=1e-6)


def _cfg(banking_subset, tmp_path, **overrides) -> FedLoraConfig:
    return FedLoraConfig(data=str(banking_subset), label_column="category", num_clients=2,
                         local_steps=4, lora_r=4, max_eval_examples=40, learning_rate=0.01,
                         out_dir=str(tmp_path / "run"), **overrides)


def _best_adapter_accuracy(run, cfg) -> float:
    saved = read_saved_adapter(run.path / "best_adapter")
    eval_cfg = cfg.replace(eval_data=str(cfg.data))  # the server's own test split
    return evaluate_saved_adapter(saved, eval_cfg, num_examples=0).metrics["accuracy"]


def test_the_best_adapter_is_the_best_rounds_and_the_summary_names_it(banking_subset, tmp_path):
    cfg = _cfg(banking_subset, tmp_path, num_rounds=2)
    run = run_federation(InProcessGrid(cfg, 2), cfg)
    rounds, summary = run.read_rounds(), run.read_summary()
    accuracies = [r["server"]["accuracy"] for r in rounds]
    best = max(range(len(accuracies)), key=lambda i: (accuracies[i], -i))
    assert summary["best-round"] == best and summary["selection-metric"] == "accuracy"
    assert summary["best"]["accuracy"] == accuracies[best]
    assert (run.path / "final_adapter").is_dir() and (run.path / "best_adapter").is_dir()
    assert _best_adapter_accuracy(run, cfg) == pytest.approx(accuracies[best], abs=1e-9)


def test_early_stopping_ends_the_run_and_keeps_the_initial_adapter_as_best(banking_subset,
                                                                           tmp_path):
    # No round can beat round 0 by 0.9 accuracy: after 1 round without improvement it stops.
    # A trained head starts at chance, so round 1 does beat round 0, by less than 0.9.
    cfg = _cfg(banking_subset, tmp_path, num_rounds=4, early_stopping_patience=1,
               early_stopping_min_delta=0.9, head_mode="train")
    run = run_federation(InProcessGrid(cfg, 2), cfg)
    rounds, summary = run.read_rounds(), run.read_summary()
    assert [r["round"] for r in rounds] == [0, 1]
    assert summary["status"] == "completed" and summary["rounds"] == 1
    assert "early stopping: accuracy did not improve by more than 0.9 for 1 rounds" in \
        summary["stopped-early"]
    assert summary["stop-reason"] == "early-stopping" and summary["best-round"] == 0
    assert rounds[1]["server"]["accuracy"] > rounds[0]["server"]["accuracy"]  # it did learn
    assert _best_adapter_accuracy(run, cfg) == pytest.approx(rounds[0]["server"]["accuracy"],
                                                             abs=1e-9)
    assert json.loads((run.path / "config.json").read_text())["early-stopping-patience"] == 1
