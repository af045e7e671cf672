"""A site's head statistics: the sums of the features its classification head reads, per split
(common/head.py), computed with the global model the server sent."""

from __future__ import annotations

import torch

from common.data import batches
from common.head import HeadStatistics
from common.model import LoraModel, autocast


def feature_statistics(lora: LoraModel, examples: list[dict], num_labels: int,
                       batch_size: int, max_feature_norm: float | None = None
                       ) -> HeadStatistics:
    """The statistics of `examples` as the head sees them: the head's input, captured on its
    way in. With max_feature_norm, each row's features are scaled down to at most that norm
    (what bounds one row's share for differential privacy)."""
    head = lora.head_module()
    captured: list[torch.Tensor] = []
    hook = head.register_forward_pre_hook(lambda _, args: captured.append(args[0]))
    stats = HeadStatistics.zeros(head.in_features, num_labels)
    try:
        lora.model.eval()
        with torch.inference_mode():
            # In length order (no seed): rows of similar length share a batch, the same sums.
            for batch in batches(examples, batch_size, lora.tokenizer.pad_token_id):
                with autocast(lora.device):
                    lora.model(input_ids=batch["input_ids"].to(lora.device),
                               attention_mask=batch["attention_mask"].to(lora.device))
                features = captured.pop().to("cpu", torch.float64)
                if max_feature_norm is not None:
                    norms = features.norm(dim=1, keepdim=True)
                    features = features * (max_feature_norm / norms).clamp(max=1.0)
                stats = stats + HeadStatistics.of(features, batch["labels"], num_labels)
    finally:
        hook.remove()
    return stats
