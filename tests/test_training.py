import pandas as pd
import torch
import torch.nn.functional as F

from client.training import planned_steps, train_adapter
from common.config import FedLoraConfig
from common.data import batches, load_splits, resolve_labels, tokenize
from common.metrics import evaluate_examples
from common.model import build_lora_model


def test_local_training_fits_the_site_data(banking_subset):
    cfg = FedLoraConfig(data=str(banking_subset), label_column="category", learning_rate=5e-3,
                        local_epochs=3)
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits)
    lora = build_lora_model(cfg, labels)
    examples = tokenize(splits.train.select(range(0, 300, 3)), lora.tokenizer, cfg, labels)

    def score():
        return evaluate_examples(lora.model, examples, batch_size=64,
                                 pad_id=lora.tokenizer.pad_token_id, device=lora.device,
                                 classification=True)

    before = score()
    stats = train_adapter(lora.model, examples, cfg, seed=0, pad_id=lora.tokenizer.pad_token_id,
                          device=lora.device)
    after = score()
    assert stats["steps"] == planned_steps(100, cfg) == 12
    assert stats["examples-seen"] == 300
    assert after["loss"] < before["loss"] - 0.2
    assert after["accuracy"] > before["accuracy"] + 0.3


def test_gradient_accumulation_equals_the_larger_batch(tiny_llama_dir, tmp_path):
    path = tmp_path / "d.csv"
    pd.DataFrame({"text": [f"card payment {'fee ' * (i % 5)}refund" for i in range(32)],
                  "label": [i % 3 for i in range(32)]}).to_csv(path, index=False)

    def trained(batch_size, accum):
        cfg = FedLoraConfig(model=str(tiny_llama_dir), data=str(path), lora_dropout=0.0,
                            batch_size=batch_size, grad_accum_steps=accum, max_grad_norm=0.0,
                            learning_rate=1e-2, test_fraction=0.1, cpu_bf16=False)
        splits = load_splits(cfg)
        labels = resolve_labels(cfg, splits)
        lora = build_lora_model(cfg, labels)
        examples = tokenize(splits.train.select(range(16)), lora.tokenizer, cfg, labels)
        stats = train_adapter(lora.model, examples, cfg, seed=1,
                              pad_id=lora.tokenizer.pad_token_id, device=lora.device)
        return lora.trainable_state(), stats

    small, small_stats = trained(batch_size=4, accum=2)
    large, large_stats = trained(batch_size=8, accum=1)
    assert small_stats["steps"] == large_stats["steps"] == 2
    initial = build_lora_model(FedLoraConfig(model=str(tiny_llama_dir)), ["0", "1", "2"])
    moved = [n for n in large if not torch.equal(large[n], initial.trainable_state()[n])]
    assert moved  # the comparison below is about real updates
    for name in large:
        assert torch.allclose(small[name], large[name], atol=1e-5), name


def test_causal_loss_covers_the_response_tokens_only(tiny_llama_dir):
    cfg = FedLoraConfig(model=str(tiny_llama_dir), task="causal-lm",
                        prompt_template="Query: {prompt}\nIntent:")
    lora = build_lora_model(cfg)
    import datasets

    rows = datasets.Dataset.from_dict({"text": ["my card has not arrived", "what is the fee"],
                                       "target": [" card arrival", " transfer fee charged"]})
    examples = tokenize(rows, lora.tokenizer, cfg)
    tok = lora.tokenizer
    for example, (prompt, response) in zip(examples, zip(rows["text"], rows["target"])):
        n_prompt = len(tok(cfg.prompt_template.format(prompt=prompt))["input_ids"])
        assert all(label == -100 for label in example["labels"][:n_prompt])
        assert example["labels"][n_prompt:] == example["input_ids"][n_prompt:]
        assert example["labels"][-1] == tok.eos_token_id
    batch = next(batches(examples, 2, tok.pad_token_id))
    lora.model.eval()
    with torch.no_grad():
        loss = lora.model(**batch).loss
        logits = lora.model(input_ids=batch["input_ids"],
                            attention_mask=batch["attention_mask"]).logits
    # Reference: next-token cross-entropy over response positions only, by hand.
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    reference = F.cross_entropy(logits[:, :-1][keep], targets[keep])
    assert torch.allclose(loss, reference, atol=1e-5)
