from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import Array, RecordDict

from common.errors import FedLoraError
from common.quantization import quantize
from common.records import (
    INT8_SCALES_KEY,
    adapter_to_record,
    check_adapter_matches,
    content_bytes,
    record_to_adapter,
)


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


def _wire_bytes(record) -> int:
    return content_bytes(RecordDict({"arrays": record}))


def _default_model_shapes(seed=0):
    """The default model's adapter for BANKING77: query/value LoRA r=8 in 6 layers, the head."""
    g = torch.Generator().manual_seed(seed)
    state = OrderedDict()
    for layer in range(6):
        for module in ("query", "value"):
            prefix = f"base_model.model.bert.encoder.layer.{layer}.attention.self.{module}"
            state[f"{prefix}.lora_A.default.weight"] = torch.randn(8, 384, generator=g) / 20
            state[f"{prefix}.lora_B.default.weight"] = torch.randn(384, 8, generator=g) / 100
    state["base_model.model.classifier.modules_to_save.default.weight"] = \
        torch.randn(77, 384, generator=g) / 50
    state["base_model.model.classifier.modules_to_save.default.bias"] = torch.zeros(77)
    return state


def test_float16_transfer_halves_the_bytes_and_rounds_like_torch():
    state = _adapter()
    full, half = adapter_to_record(state, "float32"), adapter_to_record(state, "float16")
    payload = sum(t.numel() for t in state.values())
    assert _wire_bytes(full) >= 4 * payload and _wire_bytes(half) < 0.55 * _wire_bytes(full)
    back = record_to_adapter(half)
    for name, tensor in state.items():
        assert torch.equal(back[name], tensor.half().float())


def test_int8_transfer_is_a_quarter_and_within_half_a_step():
    """One scale per slice along a matrix's smaller dimension (A: rows, B: columns)."""
    state = _default_model_shapes()
    full, packed = adapter_to_record(state, "float32"), adapter_to_record(state, "int8")
    assert _wire_bytes(packed) < 0.27 * _wire_bytes(full)
    back = record_to_adapter(packed)
    assert list(back) == list(state)
    for name, tensor in state.items():
        # The scale of each element, from the tensor itself: its slice's absmax / 127, a slice
        # being a row of a wide matrix (A, the head), a column of a tall one (B), or a vector.
        if tensor.dim() == 2:
            wide = tensor.shape[0] <= tensor.shape[1]
            absmax = tensor.abs().amax(dim=1 if wide else 0, keepdim=True)
        else:
            absmax = tensor.abs().amax()
        step = (absmax / 127).expand_as(tensor)
        assert quantize(tensor)[1].numel() == (min(tensor.shape) if tensor.dim() == 2 else 1)
        assert torch.all((back[name] - tensor).abs() <= step / 2 + 1e-7)
        assert back[name].abs().max() <= tensor.abs().max() + 1e-7
    zeros = record_to_adapter(adapter_to_record({"b": torch.zeros(4, 2)}, "int8"))
    assert torch.equal(zeros["b"], torch.zeros(4, 2))  # B starts at zero and stays exactly zero


def test_int8_records_without_their_scales_are_refused():
    packed = adapter_to_record(_adapter(), "int8")
    scales = packed.pop(INT8_SCALES_KEY)
    with pytest.raises(FedLoraError, match="int8 tensors need"):
        record_to_adapter(packed)
    packed[INT8_SCALES_KEY] = Array.from_numpy_ndarray(scales.numpy()[:-1])
    with pytest.raises(FedLoraError, match="the int8 tensors need"):
        record_to_adapter(packed)


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
