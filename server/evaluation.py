"""Server-side evaluation of the global adapter on the held-out split."""

from __future__ import annotations

import time

from flwr.app import ArrayRecord

from common.config import FedLoraConfig
from common.metrics import evaluate_examples
from common.model import LoraModel
from common.records import NUM_EXAMPLES, record_to_adapter


class GlobalEvaluator:
    """Loads a global adapter into the server's model and scores it on the tokenised test set."""

    def __init__(self, lora: LoraModel, examples: list[dict], cfg: FedLoraConfig) -> None:
        self.lora, self.examples, self.cfg = lora, examples, cfg

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        started = time.perf_counter()
        self.lora.load_trainable_state(record_to_adapter(arrays))
        metrics = evaluate_examples(self.lora.model, self.examples, batch_size=max(
            self.cfg.batch_size, 64), pad_id=self.lora.tokenizer.pad_token_id,
            device=self.lora.device, classification=self.cfg.is_classification)
        metrics[NUM_EXAMPLES] = len(self.examples)
        metrics["eval-seconds"] = time.perf_counter() - started
        return metrics
