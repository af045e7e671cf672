"""What a site's classification head reads: the sums of its features per split (common/head.py),
computed with the global model the server sent, or the features themselves (a personal head,
common/personal_head.py)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from common.data import batches
from common.head import HeadStatistics
from common.model import LoraModel, autocast


def _head_inputs(lora: LoraModel, examples: list[dict], batch_size: int, base: bool = False
                 ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(features as float64, label ids) batch by batch: the head's input, captured on its way
    in. base: the base model's features (the adapter switched off), as a site alone has them."""
    head = lora.head_module()
    # The head's wrapper sees the input whether the adapter is on or off.
    watched = lora.head_wrapper() if base else head
    captured: list[torch.Tensor] = []
    hook = watched.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    try:
        lora.model.eval()
        switched_off = lora.model.disable_adapter() if base else contextlib.nullcontext()
        with torch.inference_mode(), switched_off:
            # In length order (no seed): rows of similar length share a batch.
            for batch in batches(examples, batch_size, lora.tokenizer.pad_token_id):
                with autocast(lora.device):
                    lora.model(input_ids=batch["input_ids"].to(lora.device),
                               attention_mask=batch["attention_mask"].to(lora.device))
                yield captured.pop().to("cpu", torch.float64), batch["labels"]
    finally:
        hook.remove()


def feature_statistics(lora: LoraModel, examples: list[dict], num_labels: int,
                       batch_size: int, max_feature_norm: float | None = None
                       ) -> HeadStatistics:
    """The statistics of `examples` as the head sees them. With max_feature_norm, each row's
    features are scaled down to at most that norm (what bounds one row's share for
    differential privacy)."""
    stats = HeadStatistics.zeros(lora.head_module().in_features, num_labels)
    for features, labels in _head_inputs(lora, examples, batch_size):
        if max_feature_norm is not None:
            norms = features.norm(dim=1, keepdim=True)
            features = features * (max_feature_norm / norms).clamp(max=1.0)
        stats = stats + HeadStatistics.of(features, labels, num_labels)
    return stats


def head_features(lora: LoraModel, examples: list[dict], batch_size: int, base: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every row's head input (n x H, float64) and label id, in the order of the batches."""
    dim = lora.head_module().in_features
    parts = list(_head_inputs(lora, examples, batch_size, base))
    if not parts:
        return torch.zeros(0, dim, dtype=torch.float64), torch.zeros(0, dtype=torch.long)
    return torch.cat([f for f, _ in parts]), torch.cat([y for _, y in parts]).long()
