"""bf16 autocast in local training: only on CPUs with native bf16, never where float32 must hold."""

import pytest
import torch

import common.model
from client.head_statistics import feature_statistics
from client.training import train_adapter
from common.config import FedLoraConfig
from common.data import batch_indices, load_splits, resolve_labels, tokenize
from common.model import build_lora_model, cpu_bf16_applies, cpu_has_native_bf16, training_autocast

CPU = torch.device("cpu")


@pytest.mark.parametrize("line, native", [
    ("flags\t\t: fpu avx512f avx512bw avx512_bf16 avx512_vnni", True),  # AMD Zen 4, Cooper Lake
    ("flags\t\t: fpu avx512f amx_tile amx_bf16 amx_int8", True),  # Sapphire Rapids
    ("Features\t: fp asimd sve bf16 i8mm", True),  # Arm Neoverse V1/V2
    ("flags\t\t: fpu avx2 avx512f avx512bw avx512_vnni", False),  # AVX-512 without BF16
    ("Features\t: fp asimd evtstrm aes", False),
])
def test_native_bf16_is_read_from_the_cpu_flags(tmp_path, line, native):
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nmodel name\t: a bf16 cpu?\n{line}\n\n")
    assert cpu_has_native_bf16(cpuinfo) is native


def test_no_cpuinfo_means_float32(tmp_path):
    assert cpu_has_native_bf16(tmp_path / "absent") is False


def autocast_dtype(cfg) -> torch.dtype | None:
    with training_autocast(cfg, CPU):
        return torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None


def test_bf16_only_where_the_cpu_computes_it_natively_and_the_key_allows(monkeypatch):
    cfg = FedLoraConfig()
    assert cfg.cpu_bf16  # on by default
    monkeypatch.setattr(common.model, "cpu_has_native_bf16", lambda: True)
    assert autocast_dtype(cfg) == torch.bfloat16
    assert autocast_dtype(FedLoraConfig(cpu_bf16=False)) is None
    # What must stay float32: a base every site and the server hold alike, DP-SGD's gradients.
    for exact in (FedLoraConfig(strategy="exact"), FedLoraConfig(strategy="ffa"),
                  FedLoraConfig(dp_noise_multiplier=1.0)):
        assert not cpu_bf16_applies(exact)
        assert autocast_dtype(exact) is None
    monkeypatch.setattr(common.model, "cpu_has_native_bf16", lambda: False)
    assert not cpu_bf16_applies(cfg)
    assert autocast_dtype(cfg) is None


def test_training_computes_in_bf16_and_keeps_what_travels_and_the_statistics_float32(
        tiny_llama_dir, banking_subset, monkeypatch):
    cfg = FedLoraConfig(model=str(tiny_llama_dir), data=str(banking_subset),
                        label_column="category", local_steps=2, batch_size=8, pooling="mean")
    splits = load_splits(cfg)
    labels = resolve_labels(cfg, splits)
    lora = build_lora_model(cfg, labels)
    examples = tokenize(splits.train.select(range(16)), lora.tokenizer, cfg, labels)
    pad = lora.tokenizer.pad_token_id
    seen: list[torch.dtype] = []
    projection = next(m for n, m in lora.model.named_modules() if n.endswith("q_proj.base_layer"))
    projection.register_forward_hook(lambda _m, _i, out: seen.append(out.dtype))
    before = {name: t.clone() for name, t in lora.trainable_state().items()}

    def trained_in(native: bool) -> set[torch.dtype]:
        monkeypatch.setattr(common.model, "cpu_has_native_bf16", lambda: native)
        seen.clear()
        train_adapter(lora.model, examples, cfg, seed=0, pad_id=pad, device=CPU)
        return set(seen)

    assert trained_in(native=False) == {torch.float32}
    assert trained_in(native=True) == {torch.bfloat16}
    after = lora.trainable_state()
    assert all(t.dtype == torch.float32 for t in after.values())
    assert any(not torch.equal(after[n], before[n]) for n in after)
    seen.clear()
    stats = feature_statistics(lora, examples, len(labels), batch_size=8)
    assert set(seen) == {torch.float32}  # the head's sums come from float32 features
    assert stats.class_counts.sum() == len(examples)


def test_length_grouping_keeps_every_row_once_in_a_seeded_order():
    lengths = [(i * 37) % 23 + 1 for i in range(1000)]  # 1000 rows, lengths 1..23
    first = batch_indices(lengths, 32, shuffle_seed=7)
    rows = [i for batch in first for i in batch]
    assert sorted(rows) == list(range(1000))  # each row exactly once per epoch
    assert first == batch_indices(lengths, 32, shuffle_seed=7)  # same seed, same order
    assert first != batch_indices(lengths, 32, shuffle_seed=8)
    assert [len(b) for b in first].count(32) == 31  # 31 full batches and one of 8

    def padding(order):
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b)
                   for b in order)

    shuffled = torch.randperm(1000, generator=torch.Generator().manual_seed(7)).tolist()
    random_batches = [shuffled[s:s + 32] for s in range(0, 1000, 32)]
    assert padding(first) < padding(random_batches) / 4  # little padding left
    firsts = [min(lengths[i] for i in b) for b in first]
    assert firsts != sorted(firsts)  # the batches themselves come in no order of length
    by_length = batch_indices(lengths, 32)  # evaluation: all sorted, nothing shuffled
    assert [lengths[i] for b in by_length for i in b] == sorted(lengths)
