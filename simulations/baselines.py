"""Non-federated reference points for a federation with the same config and data split:

- centralized: one LoRA model trained on the pooled training data, processing as many samples
  as the whole federation does (rounds x sites x local steps x batch size);
- local-only: each site trains alone on its own partition for all rounds' local training; the
  score is the mean of the sites' accuracies on the global test set (local_only_sites: each
  on the rows a federated site reports its evaluation on: its validation rows, or its share of
  the test split under site-eval-rows=test).

Both make their head as the federation would (head-mode): with a fit mode, from the statistics
of the rows they train on (centralized: the pooled rows; local-only: the site's own), frozen
while LoRA trains under fit.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from client.head_statistics import feature_statistics
from client.training import frozen, planned_steps, train_adapter
from common.config import FedLoraConfig
from common.data import load_splits, resolve_labels, tokenize, train_val_split
from common.data_checks import check_site_rows
from common.head import head_state, solve_head
from common.metrics import evaluate_examples
from common.model import LoraModel, build_lora_model
from common.partitioning import deal_test_split, partition_indices
from server.strategies import resolve_head_mode


def _setup(cfg: FedLoraConfig):
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits) if cfg.is_classification else None
    return splits, labels


def _score(lora, examples, cfg):
    return evaluate_examples(lora.model, examples, batch_size=64,
                             pad_id=lora.tokenizer.pad_token_id, device=lora.device,
                             classification=cfg.is_classification)


def _split_rows(rows, lora: LoraModel, cfg: FedLoraConfig, labels, seed: int):
    """A site's checked rows, tokenised, split as a site splits them (train, validation)."""
    train_rows, val_rows = train_val_split(list(range(len(rows))), cfg.val_fraction, seed)
    return (tokenize(rows.select(train_rows), lora.tokenizer, cfg, labels),
            tokenize(rows.select(val_rows), lora.tokenizer, cfg, labels))


def _train(lora: LoraModel, train, val, cfg: FedLoraConfig, labels, steps: int,
           seed: int) -> None:
    """The head as head-mode makes it, then `steps` of LoRA training."""
    mode = resolve_head_mode(cfg, lora.pooling)
    if mode != "train":
        size = max(cfg.batch_size, 64)
        fit = solve_head(feature_statistics(lora, train, len(labels), size),
                         feature_statistics(lora, val, len(labels), size))
        lora.load_trainable_state(head_state(fit, lora.head_names()))
    with frozen(lora.model, lora.head_names() if mode == "fit" else []):
        train_adapter(lora.model, train, cfg.replace(local_steps=steps), seed=seed,
                      pad_id=lora.tokenizer.pad_token_id, device=lora.device)


def centralized(cfg: FedLoraConfig) -> dict:
    """Needs cfg.local_steps > 0, so that 'the same samples processed' is well defined."""
    splits, labels = _setup(cfg)
    lora = build_lora_model(cfg, labels)
    test = tokenize(splits.test, lora.tokenizer, cfg, labels)
    rows, _ = check_site_rows(splits.train, lora.tokenizer, cfg, labels)  # as the sites do
    train, val = _split_rows(rows, lora, cfg, labels, cfg.seed)
    steps = cfg.num_rounds * cfg.num_clients * cfg.local_steps
    _train(lora, train, val, cfg, labels, steps, cfg.seed)
    return {"steps": steps, **_score(lora, test, cfg)}


def _each_site_alone(cfg: FedLoraConfig):
    """Each site trained alone on its own partition for all rounds' local training; yields
    (partition id, its model, the examples a federated site reports its evaluation on, the
    global test examples)."""
    splits, labels = _setup(cfg)
    lora = build_lora_model(cfg, labels)
    initial = {n: t.clone() for n, t in lora.trainable_state().items()}
    test = tokenize(splits.test, lora.tokenizer, cfg, labels)
    partitions = partition_indices(splits.train, cfg)
    if cfg.site_eval_rows == "test":  # the rows the federated sites score
        dealt = deal_test_split(splits.train, partitions, splits.test, cfg.seed)
    for site, partition in enumerate(partitions):
        # What the site trains on in a federation (client/app.py): its checked rows, less
        # its validation share.
        rows, _ = check_site_rows(splits.train.select(partition), lora.tokenizer, cfg, labels)
        train, val = _split_rows(rows, lora, cfg, labels, cfg.seed + site)
        lora.load_trainable_state(initial)
        steps = cfg.num_rounds * planned_steps(len(train), cfg)
        _train(lora, train, val, cfg, labels, steps, cfg.seed + site)
        if cfg.site_eval_rows == "test":
            val = tokenize(splits.test.select(dealt[site]), lora.tokenizer, cfg, labels)
        yield site, lora, val, test


def local_only(cfg: FedLoraConfig) -> dict:
    """The mean over sites of each alone-trained model's scores on the global test set."""
    scores = [_score(lora, test, cfg) for _, lora, _, test in _each_site_alone(cfg)]
    keys = scores[0].keys()
    return {k: float(np.mean([s[k] for s in scores])) for k in keys}


def local_only_sites(cfg: FedLoraConfig) -> list[dict]:
    """Each alone-trained site scored on the rows a federated site reports its eval-* metrics
    on (site-eval-rows), with its partition id."""
    return list(each_local_only_site(cfg))


def each_local_only_site(cfg: FedLoraConfig) -> Iterator[dict]:
    """local_only_sites, one site at a time (for a progress bar)."""
    for site, lora, val, _ in _each_site_alone(cfg):
        if val:
            yield {"partition-id": site, "num-examples": len(val), **_score(lora, val, cfg)}
