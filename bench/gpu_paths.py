"""Check the CUDA paths of a site on a real GPU: device choice, bf16 / fp16 mixed precision, 4-bit
QLoRA (bitsandbytes), DP-SGD (Opacus) in bf16, and the error when 4-bit is asked for without
what it needs.

A tiny Llama-style classifier (random weights, word-level tokenizer from the data) trains on a
BANKING77 slice with the very functions a ClientApp uses (build_lora_model, train_adapter,
evaluate_examples). Needs torch, transformers, peft, tokenizers, pandas; not flwr.

    python bench/gpu_paths.py --data ../shared/data/banking77 --out gpu_paths.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from client.privacy import train_adapter_private  # noqa: E402
from client.training import train_adapter  # noqa: E402
from common.config import FedLoraConfig  # noqa: E402
from common.errors import FedLoraError  # noqa: E402
from common.metrics import evaluate_examples  # noqa: E402
from common.model import build_lora_model, pick_device  # noqa: E402


def tiny_llama(folder: Path, texts: list[str]) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    word_level = Tokenizer(models.WordLevel(unk_token="<unk>"))
    word_level.pre_tokenizer = pre_tokenizers.Whitespace()
    word_level.train_from_iterator(texts, trainers.WordLevelTrainer(
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"]))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=word_level, unk_token="<unk>",
                                        pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=256, intermediate_size=512, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id)).save_pretrained(folder)


def examples_for(frame: pd.DataFrame, tokenizer, labels: list[str]) -> list[dict]:
    encoded = tokenizer(list(frame["text"]), truncation=True, max_length=64)
    return [{"input_ids": ids, "attention_mask": mask, "labels": labels.index(label)}
            for ids, mask, label in zip(encoded["input_ids"], encoded["attention_mask"],
                                        frame["category"])]


def check(name: str, cfg: FedLoraConfig, labels, train, test) -> dict:
    torch.cuda.reset_peak_memory_stats()
    lora = build_lora_model(cfg, labels)
    trainable = {str(p.dtype) for p in lora.model.parameters() if p.requires_grad}
    frozen = {str(p.dtype) for p in lora.model.parameters() if not p.requires_grad}
    pad = lora.tokenizer.pad_token_id
    kinds = sorted({type(m).__name__ for m in lora.model.modules() if "4bit" in type(m).__name__})
    train_ex, test_ex = examples_for(train, lora.tokenizer, labels), \
        examples_for(test, lora.tokenizer, labels)
    before = evaluate_examples(lora.model, test_ex, batch_size=64, pad_id=pad,
                               device=lora.device, classification=True)
    started = time.perf_counter()
    if cfg.differential_privacy:
        stats = train_adapter_private(lora.model, train_ex, cfg, releases=1, seed=0,
                                      pad_id=pad, device=lora.device)
    else:
        stats = train_adapter(lora.model, train_ex, cfg, seed=0, pad_id=pad, device=lora.device)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - started
    after = evaluate_examples(lora.model, test_ex, batch_size=64, pad_id=pad,
                              device=lora.device, classification=True)
    sent = {str(t.dtype) for t in lora.trainable_state().values()}
    result = {"device": str(lora.device), "trainable-dtypes": sorted(trainable),
              "frozen-dtypes": sorted(frozen), "4bit-modules": kinds,
              "sent-dtypes": sorted(sent), "steps": stats["steps"],
              "train-seconds": round(seconds, 2), "accuracy-before": before["accuracy"],
              "accuracy-after": after["accuracy"], "loss-before": before["loss"],
              "loss-after": after["loss"],
              "peak-gpu-mib": round(torch.cuda.max_memory_allocated() / 2**20, 1)}
    print(name, json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", required=True, help="BANKING77 folder (train.csv, test.csv)")
    parser.add_argument("--out", default="gpu_paths.json")
    args = parser.parse_args()
    assert torch.cuda.is_available(), "this check needs a CUDA GPU"
    train = pd.read_csv(Path(args.data) / "train.csv")
    test = pd.read_csv(Path(args.data) / "test.csv")
    labels = sorted(train["category"].unique())[:10]
    train = train[train.category.isin(labels)].groupby("category").head(60)
    test = test[test.category.isin(labels)].groupby("category").head(20)
    results: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                     "auto-device": str(pick_device("auto"))}
    with tempfile.TemporaryDirectory() as folder:
        tiny_llama(Path(folder), list(train["text"]))
        base = FedLoraConfig(model=folder, lora_r=8, local_steps=60, batch_size=16,
                             learning_rate=0.003, lora_target_modules="q_proj,v_proj")
        results["bf16"] = check("bf16", base, labels, train, test)
        with mock.patch("torch.cuda.is_bf16_supported", return_value=False):
            results["fp16"] = check("fp16", base, labels, train, test)
        results["cpu"] = check("cpu", base.replace(device="cpu"), labels, train, test)
        try:
            import opacus

            results["opacus"] = opacus.__version__
            results["dp-sgd-bf16"] = check("dp-sgd-bf16", base.replace(dp_noise_multiplier=0.5),
                                           labels, train, test)
        except ImportError:
            results["opacus"] = None
        try:
            import bitsandbytes

            results["bitsandbytes"] = bitsandbytes.__version__
            results["qlora-4bit"] = check("qlora-4bit", base.replace(load_in_4bit=True),
                                          labels, train, test)
        except ImportError:
            results["bitsandbytes"] = None
        with mock.patch.dict(sys.modules, {"bitsandbytes": None}):
            try:
                build_lora_model(base.replace(load_in_4bit=True), labels)
                results["4bit-without-bitsandbytes"] = "no error (wrong)"
            except FedLoraError as err:
                results["4bit-without-bitsandbytes"] = str(err)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
