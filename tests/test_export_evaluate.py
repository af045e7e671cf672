"""`fedlora export` and `fedlora evaluate` on what a run leaves: a merged model that predicts as
the adapter model does (and loads without peft), the adapter alone, and scores that match a
computation by hand."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import torch

from common.adapters import load_adapter_model, read_saved_adapter
from common.config import FedLoraConfig
from common.model import build_lora_model
from common.records import adapter_to_record, record_to_adapter
from server.outputs import RunDirectory
from simulations.cli import main

LABELS = ["balance", "card", "transfer"]
TEXTS = ["what is my balance", "my card does not work", "send money to my sister",
         "the card was declined at the shop", "how much money do I have left"]


def _trained_run(cfg: FedLoraConfig, labels: list[str] | None) -> RunDirectory:
    """A run directory whose final adapter is far from its initialisation (random B, head)."""
    lora = build_lora_model(cfg, labels)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, param in lora.model.named_parameters():
            if param.requires_grad:
                param.add_(0.5 * torch.randn(param.shape, generator=generator))
    run = RunDirectory.create(cfg, labels)
    run.save_adapter(lora, labels)
    run.write_summary({"status": "completed"})
    return run


@pytest.fixture(scope="module")
def classification_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls_run")
    return _trained_run(FedLoraConfig(out_dir=str(out / "run"), lora_r=4), LABELS)


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cls_pooling_run")
    return _trained_run(FedLoraConfig(out_dir=str(out / "run"), lora_r=4, pooling="cls"),
                        LABELS)


@pytest.fixture(scope="module")
def causal_run(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_run")
    return _trained_run(FedLoraConfig(out_dir=str(out / "run"), model=str(tiny_llama_dir),
                                      task="causal-lm", lora_r=4), None)


def _logits(model, tokenizer, texts):
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


MERGED_LOGITS = """
import json, sys
from transformers import AutoModelForSequenceClassification, AutoTokenizer
OUT, texts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(OUT)
model = AutoModelForSequenceClassification.from_pretrained(OUT, trust_remote_code=True).eval()
logits = model(**tokenizer(texts, padding=True, return_tensors="pt")).logits
fedlora = [m for m in sys.modules if m.split(".")[0] in ("common", "server", "client",
                                                         "simulations", "peft")]
print(json.dumps({"logits": logits.tolist(), "imported": fedlora,
                  "class": type(model).__name__}))
"""


def test_mean_pooling_gives_the_same_logits_in_training_evaluation_and_the_merged_export(
        classification_run, tmp_path):
    """Training's model, the server's evaluator, `fedlora evaluate`'s loader and the merged
    export, loaded as the docs say in a fresh interpreter without fedlora or peft."""
    from server.evaluation import GlobalEvaluator

    saved = read_saved_adapter(classification_run.path)
    assert saved.pooling == "mean"
    cfg = FedLoraConfig.from_run_config(classification_run.saved_config())
    adapter_model, tokenizer = load_adapter_model(saved)
    expected = _logits(adapter_model, tokenizer, TEXTS)

    # The server's evaluator loads the global adapter's record into a model built as the
    # sites build theirs.
    training = build_lora_model(cfg, LABELS)
    loaded = dict(adapter_model.named_parameters())
    record = adapter_to_record({n: loaded[n] for n in training.trainable_state()})
    evaluator = GlobalEvaluator(training, [], cfg)
    evaluator.lora.load_trainable_state(record_to_adapter(record))
    assert torch.equal(_logits(evaluator.lora.model.eval(), tokenizer, TEXTS), expected)

    out = tmp_path / "merged"
    assert main(["export", str(classification_run.path), "--merged", str(out)]) == 0
    result = subprocess.run([sys.executable, "-c", MERGED_LOGITS, str(out), json.dumps(TEXTS)],
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    merged = json.loads(result.stdout.strip().splitlines()[-1])
    assert merged["class"] == "MeanPoolingForSequenceClassification"
    assert merged["imported"] == []
    got = torch.tensor(merged["logits"])
    assert torch.allclose(got, expected, atol=1e-4), (got - expected).abs().max()
    # The adapter changed the predictions, so the equality above is not that of two bases.
    assert not torch.allclose(_logits(build_lora_model(cfg, LABELS).model.eval(), tokenizer,
                                      TEXTS), expected, atol=1e-2)


def test_the_merged_cls_classifier_loads_as_a_plain_transformers_model(cls_run, tmp_path):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(cls_run.path), "--merged", str(out)]) == 0
    assert not (out / "adapter_config.json").exists()
    assert not (out / "modeling_fedlora.py").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(out).eval()
    assert not any("lora" in name for name in merged.state_dict())  # a plain transformers model
    assert [merged.config.id2label[i] for i in range(len(LABELS))] == LABELS

    adapter_model, tokenizer = load_adapter_model(read_saved_adapter(cls_run.path))
    expected = _logits(adapter_model, tokenizer, TEXTS)
    got = _logits(merged, AutoTokenizer.from_pretrained(out), TEXTS)
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()
    assert torch.equal(got.argmax(-1), expected.argmax(-1))


def test_the_merged_causal_lm_predicts_as_the_adapter_model(causal_run, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert main(["export", str(causal_run.path), "--merged", str(out)]) == 0
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    adapter_model, tokenizer = load_adapter_model(read_saved_adapter(causal_run.path))
    texts = ["my card does not work", "what is my balance"]
    expected = _logits(adapter_model, tokenizer, texts)
    got = _logits(merged, AutoTokenizer.from_pretrained(out), texts)
    assert torch.allclose(got, expected, atol=1e-3), (got - expected).abs().max()


def test_the_adapter_export_is_the_final_adapter(classification_run, tmp_path):
    from safetensors.torch import load_file

    out = tmp_path / "adapter"
    assert main(["export", str(classification_run.path), "--adapter", str(out)]) == 0
    original = load_file(str(classification_run.final_adapter / "adapter_model.safetensors"))
    copied = load_file(str(out / "adapter_model.safetensors"))
    assert original.keys() == copied.keys()
    assert all(torch.equal(original[k], copied[k]) for k in original)
    assert json.loads((out / "labels.json").read_text()) == LABELS
    saved = read_saved_adapter(out)  # loadable on its own, outside the run directory
    assert saved.labels == LABELS and saved.task == "classification"


def test_export_refuses_to_overwrite_and_names_a_run_without_adapter(classification_run,
                                                                     tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert main(["export", str(classification_run.path), "--merged", str(out)]) == 2
    assert "already exists (use --force" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"

    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "metrics.jsonl").write_text("")
    (unfinished / "summary.json").write_text(json.dumps({"status": "failed"}))
    assert main(["export", str(unfinished), "--adapter", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "has no final adapter (status: failed)" in err


def test_evaluate_reports_the_accuracy_computed_by_hand(classification_run, tmp_path, capsys):
    data = tmp_path / "eval.csv"
    truth = ["balance", "card", "transfer", "card", "balance"]
    pd.DataFrame({"text": TEXTS, "label": truth}).to_csv(data, index=False)
    assert main(["evaluate", "--adapter", str(classification_run.path), "--data", str(data),
                 "--examples", "2"]) == 0
    printed = capsys.readouterr().out

    model, tokenizer = load_adapter_model(read_saved_adapter(classification_run.path))
    predicted = [LABELS[i] for i in _logits(model, tokenizer, TEXTS).argmax(-1).tolist()]
    accuracy = float(np.mean(np.array(predicted) == np.array(truth)))
    row = next(line for line in printed.splitlines() if "accuracy" in line)
    assert f"{accuracy:.4f}" in row
    assert "example predictions" in printed and predicted[0] in printed and TEXTS[0] in printed


def test_evaluate_reports_perplexity_for_a_causal_lm(causal_run, tmp_path, capsys):
    data = tmp_path / "sft.jsonl"
    pd.DataFrame({"prompt": ["Query: my card does not work\nIntent:"],
                  "response": [" card"]}).to_json(data, orient="records", lines=True)
    assert main(["evaluate", "--adapter", str(causal_run.path), "--data", str(data)]) == 0
    rows = {line.split()[1]: float(line.split()[3]) for line in
            capsys.readouterr().out.splitlines() if line.startswith("│ ") and
            line.split()[1] in ("loss", "perplexity")}
    assert set(rows) == {"loss", "perplexity"} and rows["loss"] > 0
    assert rows["perplexity"] == pytest.approx(np.exp(rows["loss"]), rel=1e-3)


def test_evaluate_names_unknown_labels(classification_run, tmp_path, capsys):
    data = tmp_path / "eval.csv"
    pd.DataFrame({"text": ["hello"], "label": ["refund"]}).to_csv(data, index=False)
    assert main(["evaluate", "--adapter", str(classification_run.path), "--data",
                 str(data)]) == 2
    assert "not in the shared label set, e.g. 'refund'" in capsys.readouterr().err


def test_a_sites_personal_head_replaces_the_global_one_in_evaluate_and_export(
        classification_run, tmp_path, capsys):
    from safetensors.torch import load_file

    from common.adapters import apply_personal_head, write_personal_head

    model, tokenizer = load_adapter_model(read_saved_adapter(classification_run.path))
    generator = torch.Generator().manual_seed(7)
    site = tmp_path / "site-0"
    write_personal_head(site, torch.randn(3, 384, generator=generator),
                        torch.randn(3, generator=generator), {"round": "3"})
    apply_personal_head(model, site)
    predicted = [LABELS[i] for i in _logits(model, tokenizer, TEXTS).argmax(-1).tolist()]
    truth = ["balance", "card", "transfer", "card", "balance"]
    data = tmp_path / "eval.csv"
    pd.DataFrame({"text": TEXTS, "label": truth}).to_csv(data, index=False)
    assert main(["evaluate", "--adapter", str(classification_run.path), "--data", str(data),
                 "--personal-head", str(site)]) == 0
    row = next(line for line in capsys.readouterr().out.splitlines() if "accuracy" in line)
    accuracy = float(np.mean(np.array(predicted) == np.array(truth)))
    assert f"{accuracy:.4f}" in row

    out = tmp_path / "personal-adapter"
    assert main(["export", str(classification_run.path), "--adapter", str(out),
                 "--personal-head", str(site / "personal_head.safetensors")]) == 0
    exported = load_file(str(out / "adapter_model.safetensors"))
    head = load_file(str(site / "personal_head.safetensors"))
    assert any(torch.equal(t, head["weight"]) for t in exported.values())
    reloaded, _ = load_adapter_model(read_saved_adapter(out))
    assert torch.allclose(_logits(reloaded, tokenizer, TEXTS), _logits(model, tokenizer, TEXTS),
                          atol=1e-5)

    assert main(["evaluate", "--adapter", str(classification_run.path), "--data", str(data),
                 "--personal-head", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "personal head" in err and "does not exist" in err
