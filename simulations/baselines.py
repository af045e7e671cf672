"""Non-federated reference points for a federation with the same config and data split:

- centralized: one LoRA model trained on the pooled training data, processing as many samples
  as the whole federation does (rounds x sites x local steps x batch size);
- local-only: each site trains alone on its own partition for all rounds' local steps; the
  score is the mean of the sites' accuracies on the global test set.
"""

from __future__ import annotations

import numpy as np

from client.training import train_adapter
from common.config import FedLoraConfig
from common.data import load_splits, resolve_labels, tokenize, train_val_split
from common.data_checks import check_site_rows
from common.metrics import evaluate_examples
from common.model import build_lora_model
from simulations.partitioning import partition_indices


def _setup(cfg: FedLoraConfig):
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits) if cfg.is_classification else None
    return splits, labels


def _score(lora, examples, cfg):
    return evaluate_examples(lora.model, examples, batch_size=64,
                             pad_id=lora.tokenizer.pad_token_id, device=lora.device,
                             classification=cfg.is_classification)


def centralized(cfg: FedLoraConfig) -> dict:
    """Needs cfg.local_steps > 0, so that 'the same samples processed' is well defined."""
    splits, labels = _setup(cfg)
    lora = build_lora_model(cfg, labels)
    test = tokenize(splits.test, lora.tokenizer, cfg, labels)
    rows, _ = check_site_rows(splits.train, lora.tokenizer, cfg, labels)  # as the sites do
    pooled = tokenize(rows, lora.tokenizer, cfg, labels)
    steps = cfg.num_rounds * cfg.num_clients * cfg.local_steps
    train_adapter(lora.model, pooled, cfg.replace(local_steps=steps), seed=cfg.seed,
                  pad_id=lora.tokenizer.pad_token_id, device=lora.device)
    return {"steps": steps, **_score(lora, test, cfg)}


def local_only(cfg: FedLoraConfig) -> dict:
    splits, labels = _setup(cfg)
    lora = build_lora_model(cfg, labels)
    initial = {n: t.clone() for n, t in lora.trainable_state().items()}
    test = tokenize(splits.test, lora.tokenizer, cfg, labels)
    scores = []
    for site, partition in enumerate(partition_indices(splits.train, cfg)):
        # What the site trains on in a federation (client/app.py): its checked rows, less
        # its validation share.
        rows, _ = check_site_rows(splits.train.select(partition), lora.tokenizer, cfg, labels)
        train_rows, _ = train_val_split(list(range(len(rows))), cfg.val_fraction, cfg.seed + site)
        examples = tokenize(rows.select(train_rows), lora.tokenizer, cfg, labels)
        lora.load_trainable_state(initial)
        train_adapter(lora.model, examples,
                      cfg.replace(local_steps=cfg.num_rounds * cfg.local_steps),
                      seed=cfg.seed + site, pad_id=lora.tokenizer.pad_token_id,
                      device=lora.device)
        scores.append(_score(lora, test, cfg))
    keys = scores[0].keys()
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}
