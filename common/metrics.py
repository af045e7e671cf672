"""Metric math on plain arrays (tested against scikit-learn), and the shared evaluation loop."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

from common.data import batches
from common.model import autocast


def accuracy(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    return float(np.mean(y_true == y_pred)) if len(y_true) else 0.0


def macro_f1(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Unweighted mean of per-class F1 over the classes present in y_true or y_pred."""
    classes = np.union1d(y_true, y_pred)
    if len(classes) == 0:
        return 0.0
    scores = []
    for c in classes:
        tp = np.sum((y_pred == c) & (y_true == c))
        fp = np.sum((y_pred == c) & (y_true != c))
        fn = np.sum((y_pred != c) & (y_true == c))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return float(np.mean(scores))


@torch.inference_mode()
def evaluate_examples(model: torch.nn.Module, examples: list[dict], *, batch_size: int,
                      pad_id: int, device: torch.device, classification: bool,
                      on_batch: Callable[[int], None] | None = None) -> dict:
    """Loss (mean per example for classification, per response token for causal LM) and
    accuracy + macro-F1 or perplexity. on_batch(n) after each batch of n examples (progress)."""
    model.eval()
    total_loss, total_count = 0.0, 0
    predictions, targets = [], []
    for batch in batches(examples, batch_size, pad_id):
        batch = {k: v.to(device) for k, v in batch.items()}
        with autocast(device):
            out = model(**batch)
        if classification:
            n = batch["labels"].shape[0]
            predictions.append(out.logits.argmax(-1).cpu().numpy())
            targets.append(batch["labels"].cpu().numpy())
        else:
            # HF averages over the batch's response tokens; weight by them for an exact mean.
            n = int((batch["labels"][:, 1:] != -100).sum())
        total_loss += float(out.loss) * n
        total_count += n
        if on_batch is not None:
            on_batch(batch["input_ids"].shape[0])
    loss = total_loss / max(total_count, 1)
    if classification:
        y_pred, y_true = np.concatenate(predictions), np.concatenate(targets)
        return {"loss": loss, "accuracy": accuracy(y_true, y_pred),
                "macro-f1": macro_f1(y_true, y_pred)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
