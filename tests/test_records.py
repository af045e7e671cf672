from collections import OrderedDict

import numpy as np
import pytest
import torch

from common.errors import FedLoraError
from common.records import adapter_to_record, check_adapter_matches, record_bytes, record_to_adapter


def _adapter(seed=0):
    g = torch.Generator().manual_seed(seed)
    return OrderedDict([
        ("base_model.model.layer.0.query.lora_A.default.weight", torch.randn(8, 384, generator=g)),
        ("base_model.model.layer.0.query.lora_B.default.weight", torch.randn(384, 8, generator=g)),
        ("base_model.model.classifier.modules_to_save.default.bias", torch.randn(77, generator=g)),
    ])


def test_float32_round_trip_is_bit_exact():
    state = _adapter()
    back = record_to_adapter(adapter_to_record(state, "float32"))
    assert list(back) == list(state)
    for name in state:
        assert back[name].dtype == torch.float32
        bits = back[name].numpy().view(np.uint32)
        assert np.array_equal(bits, state[name].numpy().view(np.uint32))


def test_float16_transfer_halves_the_bytes_and_rounds_like_torch():
    state = _adapter()
    full, half = adapter_to_record(state, "float32"), adapter_to_record(state, "float16")
    payload = sum(t.numel() for t in state.values())
    assert record_bytes(full) >= 4 * payload and record_bytes(half) < 0.55 * record_bytes(full)
    back = record_to_adapter(half)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor.half().float())


def test_bfloat16_tensors_travel_as_float32():
    state = OrderedDict(w=torch.randn(4, 4).to(torch.bfloat16))
    back = record_to_adapter(adapter_to_record(state, "float32"))
    assert torch.equal(back["w"], state["w"].float())


def test_mismatched_adapters_are_named():
    reference = _adapter()
    missing = OrderedDict(list(reference.items())[:2])
    with pytest.raises(FedLoraError, match="missing 1 tensor"):
        check_adapter_matches(missing, reference, sender="node 7")
    extra = OrderedDict(reference, extra=torch.zeros(1))
    with pytest.raises(FedLoraError, match="unexpected tensor"):
        check_adapter_matches(extra, reference, sender="node 7")
    reshaped = OrderedDict(reference)
    reshaped["base_model.model.layer.0.query.lora_A.default.weight"] = torch.zeros(4, 384)
    with pytest.raises(FedLoraError, match=r"node 7: tensor .*lora_A.* has shape \(4, 384\)"):
        check_adapter_matches(reshaped, reference, sender="node 7")
    check_adapter_matches(_adapter(seed=1), reference, sender="node 7")
