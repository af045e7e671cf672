"""A sequence classifier on the mean of a model's last hidden states, scaled to unit length.

Models trained for sentence embeddings (sentence-transformers' all-MiniLM-L6-v2, the default)
were trained with mean pooling; the [CLS] pooler that AutoModelForSequenceClassification puts
in front of the head is not what their embeddings were made for. Unit length bounds what one
example adds to the head statistics (common/head.py), which differential privacy needs.

This file imports nothing from fedlora: a merged export ships it as `modeling_fedlora.py`
beside its weights, so that `AutoModelForSequenceClassification.from_pretrained(OUT,
trust_remote_code=True)` builds the very model that was trained, without fedlora or peft.
"""

from __future__ import annotations

import torch
from transformers import AutoModel, PreTrainedModel
from transformers.modeling_outputs import SequenceClassifierOutput

# The Auto class a merged export maps to this file (config.json's auto_map).
AUTO_MAP = {"AutoModelForSequenceClassification":
            "modeling_fedlora.MeanPoolingForSequenceClassification"}


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The mean over each row's real tokens, scaled to unit L2 norm (computed in float32)."""
    mask = attention_mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.to(torch.float32) * mask).sum(dim=1)
    mean = summed / mask.sum(dim=1).clamp(min=1.0)
    return torch.nn.functional.normalize(mean, dim=-1)


class MeanPoolingForSequenceClassification(PreTrainedModel):
    """The base model (any AutoModel), mean pooling, one linear layer `classifier`."""

    base_model_prefix = "encoder"
    supports_gradient_checkpointing = True
    _supports_sdpa = True

    def __init__(self, config, encoder: torch.nn.Module | None = None) -> None:
        super().__init__(config)
        # With an encoder already loaded (training), its pretrained weights are kept as they are.
        self.encoder = encoder if encoder is not None else AutoModel.from_config(config)
        self.classifier = torch.nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        if module is getattr(self, "classifier", None):
            std = getattr(self.config, "initializer_range", 0.02)
            torch.nn.init.normal_(module.weight, std=std)
            torch.nn.init.zeros_(module.bias)

    def get_input_embeddings(self) -> torch.nn.Module:
        return self.encoder.get_input_embeddings()

    def forward(self, input_ids: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                labels: torch.Tensor | None = None, inputs_embeds: torch.Tensor | None = None,
                **kwargs) -> SequenceClassifierOutput:
        if attention_mask is None:
            source = input_ids if input_ids is not None else inputs_embeds[..., 0]
            attention_mask = torch.ones(source.shape[:2], dtype=torch.long, device=source.device)
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask,
                              inputs_embeds=inputs_embeds).last_hidden_state
        pooled = mean_pool(hidden, attention_mask)
        logits = self.classifier(pooled.to(self.classifier.weight.dtype))
        loss = None
        if labels is not None:
            loss = torch.nn.functional.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)
