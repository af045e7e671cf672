"""Client training throughput against a plain PyTorch + peft loop (issues: performance, time to
accuracy).

In one process, on the same model and examples, alternating:
- fedlora: client/training.py's train_adapter as a site runs it (batches grouped by length,
  bf16 autocast where the CPU has native bf16 and cpu-bf16 is on);
- fedlora, float32: the same with cpu-bf16=false;
- plain: float32 forward, backward, gradient clipping and AdamW over shuffled batches
  collated beforehand (padded to the longest row of each batch);
- plain, bf16 autocast: the same under torch.autocast("cpu", dtype=torch.bfloat16);
- with --padded, plain, padded to max-length: every batch padded to max-length, as a loop
  without dynamic padding would.
Samples per second, the median of --repeats alternations. Writes throughput.json under --out.

    .venv/bin/python bench/throughput.py --data ../shared/data/banking77
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import save_results  # noqa: E402  (bench/results.py)

from client.training import train_adapter  # noqa: E402
from common.config import FedLoraConfig  # noqa: E402
from common.data import batches, load_splits, resolve_labels, tokenize  # noqa: E402
from common.model import build_lora_model, cpu_bf16_applies  # noqa: E402


def plain_step(model, batch, params, optimizer, cfg: FedLoraConfig, bf16: bool = False) -> None:
    """One step of the plain peft loop: forward, backward, gradient clipping, AdamW."""
    model.train()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        loss = model(**batch).loss
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def plain_loop(model, batch_list, cfg: FedLoraConfig, bf16: bool = False) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate)
    for batch in batch_list:
        plain_step(model, batch, params, optimizer, cfg, bf16)


def padded_to(batch: dict, width: int, pad_id: int) -> dict:
    extra = width - batch["input_ids"].shape[1]
    return {"input_ids": torch.nn.functional.pad(batch["input_ids"], (0, extra), value=pad_id),
            "attention_mask": torch.nn.functional.pad(batch["attention_mask"], (0, extra)),
            "labels": batch["labels"]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=str(ROOT.parent / "shared/data/banking77"))
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-throughput"))
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--padded", action="store_true", help="add the padded plain loop")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)  # as a site does with client-num-cpus
    cfg = FedLoraConfig(data=args.data, label_column="category", local_steps=args.steps,
                        batch_size=32)
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits)
    lora = build_lora_model(cfg, labels)
    pad = lora.tokenizer.pad_token_id
    examples = tokenize(splits.train.select(range(cfg.batch_size * args.steps)), lora.tokenizer,
                        cfg, labels)
    initial = lora.trainable_state()
    same_batches = list(batches(examples, cfg.batch_size, pad, shuffle_seed=0, by_length=False))
    float32 = dataclasses.replace(cfg, cpu_bf16=False)
    runs = {
        "fedlora": lambda: train_adapter(lora.model, examples, cfg, seed=0, pad_id=pad,
                                         device=torch.device("cpu")),
        "fedlora, float32": lambda: train_adapter(lora.model, examples, float32, seed=0,
                                                  pad_id=pad, device=torch.device("cpu")),
        "plain": lambda: plain_loop(lora.model, same_batches, cfg),
        "plain, bf16 autocast": lambda: plain_loop(lora.model, same_batches, cfg, bf16=True),
    }
    if args.padded:
        runs["plain, padded to max-length"] = lambda: plain_loop(
            lora.model, [padded_to(b, cfg.max_length, pad) for b in same_batches], cfg)
    seconds: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.repeats + 1):  # the first alternation warms up and is not counted
        for name, run in runs.items():
            lora.load_trainable_state(initial)
            started = time.perf_counter()
            run()
            seconds[name].append(time.perf_counter() - started)
    samples = cfg.batch_size * args.steps
    result = {name: {"samples-per-second": samples / statistics.median(times[1:]),
                     "seconds": times[1:]} for name, times in seconds.items()}
    result["fedlora / plain"] = (result["fedlora"]["samples-per-second"]
                                 / result["plain"]["samples-per-second"])
    result["setting"] = {"threads": args.threads, "steps": args.steps,
                         "batch-size": cfg.batch_size, "max-length": cfg.max_length,
                         "mean-tokens": statistics.mean(len(e["input_ids"]) for e in examples),
                         "cpu-bf16 applies": cpu_bf16_applies(cfg)}
    save_results(Path(args.out), "throughput.json", result)


if __name__ == "__main__":
    main()
