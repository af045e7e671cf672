"""Local training: a plain AdamW loop over the trainable (LoRA + head) parameters."""

from __future__ import annotations

import contextlib
import math

import torch

from common.config import FedLoraConfig
from common.data import batches
from common.model import compute_dtype, training_autocast


def planned_steps(num_examples: int, cfg: FedLoraConfig) -> int:
    """Optimiser steps this round: local-steps if set, else local-epochs over the data."""
    if cfg.local_steps:
        return cfg.local_steps
    micro_batches = math.ceil(num_examples / cfg.batch_size)
    return max(1, cfg.local_epochs * micro_batches // cfg.grad_accum_steps)


def class_weights(examples: list[dict], num_labels: int) -> torch.Tensor:
    """Weight n / (classes present x count) per class of this site's data: every class present
    weighs as much in the loss as any other; absent classes get weight 1 (they never occur)."""
    counts = torch.bincount(torch.tensor([e["labels"] for e in examples], dtype=torch.long),
                            minlength=num_labels).double()
    present = counts > 0
    weights = torch.ones(num_labels, dtype=torch.float64)
    weights[present] = counts.sum() / (present.sum() * counts[present])
    return weights.float()


def batch_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor],
               weights: torch.Tensor | None) -> torch.Tensor:
    if weights is None:
        return model(**batch).loss.float()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.nn.functional.cross_entropy(logits.float(), batch["labels"],
                                             weight=weights.to(logits.device))


@contextlib.contextmanager
def frozen(model: torch.nn.Module, names: list[str]):
    """The named trainable parameters left out of training for the duration (a fitted head)."""
    params = [p for n, p in model.named_parameters() if n in set(names) and p.requires_grad]
    for param in params:
        param.requires_grad_(False)
    try:
        yield
    finally:
        for param in params:
            param.requires_grad_(True)


def train_adapter(model: torch.nn.Module, examples: list[dict], cfg: FedLoraConfig, *,
                  seed: int, pad_id: int, device: torch.device,
                  anchor: list[torch.Tensor] | None = None) -> dict:
    """Train in place; return the mean loss, optimiser steps and examples processed.
    With an anchor (FedProx), add (mu/2) * ||w - anchor||^2 over the trainable tensors.
    With class-weighted-loss, each class weighs by the inverse of its share of the examples."""
    torch.manual_seed(seed)  # LoRA dropout
    weights = (class_weights(examples, model.config.num_labels)
               if cfg.class_weighted_loss else None)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    total_steps = planned_steps(len(examples), cfg)
    # fp16 (GPUs without bf16) needs loss scaling; bf16 and fp32 do not.
    scaler = torch.amp.GradScaler(device.type, enabled=compute_dtype(device) == torch.float16)
    precision = training_autocast(cfg, device)  # decided once; entered for every batch
    steps, micro, loss_sum, seen, epoch = 0, 0, 0.0, 0, 0
    while steps < total_steps:
        for batch in batches(examples, cfg.batch_size, pad_id, shuffle_seed=seed + epoch,
                             micro_batches=cfg.grad_accum_steps):
            batch = {k: v.to(device) for k, v in batch.items()}
            with precision:
                loss = batch_loss(model, batch, weights)
            objective = loss
            if anchor is not None:
                objective = loss + cfg.proximal_mu / 2 * sum(
                    (p - a).pow(2).sum() for p, a in zip(params, anchor))
            scaler.scale(objective / cfg.grad_accum_steps).backward()
            loss_sum += loss.detach().item()
            micro += 1
            seen += batch["input_ids"].shape[0]
            if micro % cfg.grad_accum_steps:
                continue
            scaler.unscale_(optimizer)
            if cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            steps += 1
            if steps == total_steps:
                break
        epoch += 1
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss_sum / max(micro, 1), "steps": steps, "examples-seen": seen}
