"""A causal-LM client's training throughput and peak memory, with and without gradient
checkpointing (issue: performance, item 5): a ~100M-parameter Llama-style model (hidden 768,
12 layers, 12 heads, MLP 2048, vocabulary 8,000, tied embeddings; random weights), LoRA r=8 on
q_proj/v_proj, trained by client/training.py's loop on batches of full-length sequences.

The token ids are random (throughput and memory do not depend on them). Each variant runs in
its own process so that its peak memory is its own: CUDA's peak allocation on a GPU, the peak
resident set on a CPU. Writes causal_lm.json under --out.

    .venv/bin/python bench/causal_lm.py                 # CPU here; on a GPU: --device cuda
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from results import save_results  # noqa: E402  (bench/results.py)

VOCAB = 8000


def save_model(folder: Path) -> int:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<pad>": 1, "<s>": 2, "</s>": 3,
             **{f"w{i}": i + 4 for i in range(VOCAB - 4)}}
    word_level = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>", pad_token="<pad>",
                            bos_token="<s>", eos_token="</s>").save_pretrained(folder)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=768, intermediate_size=2048,
                         num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
                         max_position_embeddings=1024, tie_word_embeddings=True, pad_token_id=1,
                         bos_token_id=2, eos_token_id=3)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder)
    return sum(p.numel() for p in model.parameters())


def one_variant(args: argparse.Namespace) -> dict:
    from client.training import train_adapter
    from common.config import FedLoraConfig
    from common.model import build_lora_model

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as folder:
        parameters = save_model(Path(folder))
        cfg = FedLoraConfig(model=folder, task="causal-lm", lora_r=8, lora_dropout=0.0,
                            max_length=args.seq_len, batch_size=args.batch_size,
                            device=args.device, gradient_checkpointing=args.checkpointing)
        lora = build_lora_model(cfg)
    device = lora.device
    generator = torch.Generator().manual_seed(0)
    examples = []
    for _ in range(args.batch_size * (args.steps + 1)):
        ids = torch.randint(4, VOCAB, (args.seq_len,), generator=generator).tolist()
        examples.append({"input_ids": ids, "attention_mask": [1] * args.seq_len,
                         "labels": ids})
    warm, timed = examples[:args.batch_size], examples[args.batch_size:]
    train_adapter(lora.model, warm, cfg.replace(local_steps=1), seed=0, pad_id=1,
                  device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # GiB (KiB units)
    started = time.perf_counter()
    train_adapter(lora.model, timed, cfg.replace(local_steps=args.steps), seed=0, pad_id=1,
                  device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    result = {"gradient-checkpointing": args.checkpointing, "device": str(device),
              "device-name": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
              "parameters": parameters, "trainable": sum(p.numel() for p in
                                                         lora.model.parameters()
                                                         if p.requires_grad),
              "tokens-per-second": args.steps * args.batch_size * args.seq_len / seconds,
              "seconds-per-step": seconds / args.steps,
              "peak-rss-gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
              "rss-before-training-gib": rss_before}
    if device.type == "cuda":
        result["peak-cuda-gib"] = torch.cuda.max_memory_allocated() / 2**30
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=str(ROOT / "runs" / "bench-causal-lm"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--checkpointing", choices=["true", "false"])
    args = parser.parse_args()
    if args.checkpointing:  # one variant, in this process
        args.checkpointing = args.checkpointing == "true"
        print(json.dumps(one_variant(args)))
        return
    results = []
    for checkpointing in ("false", "true"):
        done = subprocess.run([sys.executable, __file__, "--checkpointing", checkpointing,
                               "--device", args.device, "--seq-len", str(args.seq_len),
                               "--batch-size", str(args.batch_size), "--steps", str(args.steps),
                               "--threads", str(args.threads)],
                              check=True, capture_output=True, text=True)
        results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    save_results(Path(args.out), "causal_lm.json", results)


if __name__ == "__main__":
    main()
