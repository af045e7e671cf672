"""A site's personal head (config personal-head): at every evaluation, the site solves a head of
its own from its training rows' features under the global model, pulled toward the global head
(common/personal_head.py), scores it and the global head on its validation rows, and keeps it
in its own folder. The personal head is never loaded into the model that trains and never sent:
only the accuracies travel, with the evaluation's other metrics.

Beside it, once per site and process, the local-only reference: the site's own head on the base
model's features, as the site would have it without the federation. With personal-steps, after
the last round the site also trains the global adapter with its personal head on its own rows
and keeps that as its personal adapter, likewise never sent."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from client.head_statistics import head_features
from common.adapters import write_personal_head
from common.config import FedLoraConfig
from common.errors import FedLoraError
from common.model import LoraModel
from common.personal_head import (
    LinearHead,
    PersonalFit,
    accuracy,
    choose_local_head,
    choose_personal_head,
)

PERSONAL_ADAPTER_FOLDER = "personal_adapter"


def global_head(lora: LoraModel) -> LinearHead:
    head = lora.head_module()
    if head.bias is None:
        raise FedLoraError("personal-head needs a classification head with a bias; this "
                           "model's head has none")
    return LinearHead(head.weight.detach().to("cpu", torch.float64),
                      head.bias.detach().to("cpu", torch.float64))


def personal_fit(lora: LoraModel, train_examples: list[dict], cfg: FedLoraConfig,
                 seed: int) -> PersonalFit:
    """The personal head of these rows under the model's current (global) adapter."""
    features, labels = head_features(lora, train_examples, max(cfg.batch_size, 64))
    anchor = global_head(lora)
    mu = cfg.personal_mu_value
    if mu is None:
        return choose_personal_head(features, labels, anchor, seed=seed)
    # A fixed pull: the prior's weight is still chosen on the rows.
    return choose_personal_head(features, labels, anchor, grid=(mu,), seed=seed,
                                keep_anchor=False)


def personal_metrics(lora: LoraModel, fit: PersonalFit, val_examples: list[dict],
                     cfg: FedLoraConfig) -> dict[str, float]:
    """The personal head's accuracy on the validation rows, and what it was chosen with: the
    pull (eval-personal-mu, absent for the anchor itself) and the weight of the site's label
    prior on the biases (eval-personal-kept-global 1: the global head as sent was best on
    the training rows)."""
    metrics = {"eval-personal-kept-global": float(math.isinf(fit.mu) and not fit.prior_weight),
               "eval-personal-prior-weight": fit.prior_weight}
    if math.isfinite(fit.mu):
        metrics["eval-personal-mu"] = fit.mu
    if val_examples:
        features, labels = head_features(lora, val_examples, max(cfg.batch_size, 64))
        metrics["eval-personal-accuracy"] = accuracy(fit.head, features, labels)
    return metrics


def local_head_accuracy(lora: LoraModel, train_examples: list[dict], val_examples: list[dict],
                        cfg: FedLoraConfig, seed: int) -> float | None:
    """The site alone: its own head (ridge, chosen on its training rows) on the base model's
    features, scored on its validation rows; None without validation rows."""
    if not val_examples:
        return None
    size = max(cfg.batch_size, 64)
    features, labels = head_features(lora, train_examples, size, base=True)
    fit = choose_local_head(features, labels, lora.head_module().out_features, seed=seed)
    val_features, val_labels = head_features(lora, val_examples, size, base=True)
    return accuracy(fit.head, val_features, val_labels)


def personal_folder(cfg: FedLoraConfig, site_dir: str | None, run_id: int, site_id: int
                    ) -> Path:
    """Where a site keeps its personal head: a deployed site in its personal-dir (`site_dir`;
    "" = ~/.fedlora/personal), one folder a run; a simulated site under the run directory."""
    if site_dir is not None:
        return Path(site_dir or Path.home() / ".fedlora" / "personal").expanduser() / \
            f"run-{run_id}"
    if cfg.out_dir:
        return Path(cfg.out_dir) / "sites" / f"site-{site_id}"
    return Path.home() / ".fedlora" / "personal" / f"run-{run_id}" / f"site-{site_id}"


def save_personal_head(folder: Path, fit: PersonalFit, *, server_round: int, site_id: int,
                       model: str) -> Path:
    return write_personal_head(folder, fit.head.weight, fit.head.bias, {
        "round": str(server_round), "site": str(site_id), "mu": str(fit.mu),
        "prior-weight": str(fit.prior_weight),
        "base-model": model})


def personal_adapter(lora: LoraModel, fit: PersonalFit, train_examples: list[dict],
                     val_examples: list[dict], cfg: FedLoraConfig, *, labels: list[str],
                     folder: Path, seed: int) -> float | None:
    """The global adapter with the personal head, trained personal-steps steps on the site's
    own rows at personal-learning-rate and kept in `folder` as a PEFT adapter (`fedlora
    evaluate --adapter FOLDER`); its accuracy on the evaluation rows (None without any). The
    model is left as it was: the personal adapter is never in what the site sends."""
    from client.training import train_adapter
    from common.adapters import save_adapter_folder
    from common.metrics import evaluate_examples

    as_received = {name: t.clone() for name, t in lora.trainable_state().items()}
    head = {name: (fit.head.bias if name.endswith("bias") else fit.head.weight)
            for name in lora.head_names()}
    try:
        lora.load_trainable_state(head)
        train_adapter(lora.model, train_examples,
                      cfg.replace(local_steps=cfg.personal_steps,
                                  learning_rate=cfg.effective_personal_lr()),
                      seed=seed, pad_id=lora.tokenizer.pad_token_id, device=lora.device)
        save_adapter_folder(lora, labels, folder / PERSONAL_ADAPTER_FOLDER)
        if not val_examples:
            return None
        return evaluate_examples(lora.model, val_examples, batch_size=cfg.batch_size,
                                 pad_id=lora.tokenizer.pad_token_id, device=lora.device,
                                 classification=True)["accuracy"]
    finally:
        lora.load_trainable_state(as_received)
