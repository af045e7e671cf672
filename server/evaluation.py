"""Server-side evaluation of the global adapter on the held-out split, and of a saved adapter
(`fedlora evaluate`)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import torch
from flwr.app import ArrayRecord

from common.adapters import SavedAdapter, load_adapter_model
from common.config import FedLoraConfig
from common.data import collate, columns, load_server_splits, tokenize
from common.metrics import evaluate_examples
from common.model import LoraModel, pick_device
from common.records import NUM_EXAMPLES, record_to_adapter


class GlobalEvaluator:
    """Loads a global adapter into the server's model and scores it on the tokenised test set."""

    def __init__(self, lora: LoraModel, examples: list[dict], cfg: FedLoraConfig) -> None:
        self.lora, self.examples, self.cfg = lora, examples, cfg

    def __call__(self, arrays: ArrayRecord) -> dict[str, float]:
        started, cpu_started = time.perf_counter(), time.process_time()
        self.lora.load_trainable_state(record_to_adapter(arrays))
        metrics = evaluate_examples(self.lora.model, self.examples, batch_size=max(
            self.cfg.batch_size, 64), pad_id=self.lora.tokenizer.pad_token_id,
            device=self.lora.device, classification=self.cfg.is_classification)
        metrics[NUM_EXAMPLES] = len(self.examples)
        metrics["eval-seconds"] = time.perf_counter() - started
        # The process's CPU seconds meanwhile (all threads: torch's too): the evaluation's own
        # work, as long as the process does little else; wall seconds stretch when the
        # evaluation shares the cores with the sites.
        metrics["eval-cpu-seconds"] = time.process_time() - cpu_started
        return metrics


@dataclass
class AdapterEvaluation:
    metrics: dict[str, float]  # accuracy + macro-F1, or loss + perplexity; num-examples
    examples: list[dict[str, str]]  # a few inputs with their reference and the prediction


def evaluate_saved_adapter(saved: SavedAdapter, cfg: FedLoraConfig, num_examples: int = 5,
                           on_progress: Callable[[int, int], None] | None = None,
                           ) -> AdapterEvaluation:
    """Score a saved adapter on cfg.eval_data (a file: all of it; a folder: its test split, else
    validation, else train), as the server scores the global adapter. on_progress(done, total)
    after each batch."""
    device = pick_device(cfg.device)
    model, tokenizer = load_adapter_model(saved, device)
    rows = load_server_splits(cfg).test
    examples = tokenize(rows, tokenizer, cfg, saved.labels)
    done = [0]

    def count(n: int) -> None:
        done[0] += n
        if on_progress is not None:
            on_progress(done[0], len(examples))

    metrics = evaluate_examples(model, examples, batch_size=max(cfg.batch_size, 64),
                                pad_id=tokenizer.pad_token_id, device=device,
                                classification=cfg.is_classification, on_batch=count)
    metrics[NUM_EXAMPLES] = len(examples)
    shown = rows.select(range(min(num_examples, len(rows))))
    if cfg.is_classification:
        predicted = _predict_labels(model, examples[:len(shown)], tokenizer.pad_token_id,
                                    saved.labels)
        samples = [{"input": text, "reference": target, "prediction": label}
                   for text, target, label in zip(*columns(shown, "text", "target"), predicted)]
    else:
        samples = [{"input": prompt, "reference": target,
                    "prediction": _generate(model, tokenizer, cfg, prompt)}
                   for prompt, target in zip(*columns(shown, "text", "target"))]
    return AdapterEvaluation(metrics=metrics, examples=samples)


@torch.inference_mode()
def _predict_labels(model, examples: list[dict], pad_id: int, labels: list[str]) -> list[str]:
    if not examples:
        return []
    batch = collate(examples, pad_id)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return [labels[i] for i in logits.argmax(-1).tolist()]


@torch.inference_mode()
def _generate(model, tokenizer, cfg: FedLoraConfig, prompt: str, max_new_tokens: int = 32) -> str:
    """Greedy continuation of the prompt, as the model was trained to answer it."""
    encoded = tokenizer(cfg.prompt_template.format(prompt=prompt), return_tensors="pt")
    output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
