"""Adapter tensors <-> Flower ArrayRecord, and the check that a received adapter fits a model.

Only trainable tensors travel (LoRA factors and, for classification, the head), cast to the
configured transfer dtype: ArrayRecord rejects bfloat16, and float16 halves the bytes.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from typing import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, RecordDict
from flwr.common import Parameters, ndarrays_to_parameters, parameters_to_ndarrays

from common.errors import FedLoraError
from common.flower_compat import recorddict_to_proto
from common.quantization import dequantize, num_scales, quantize

NUM_EXAMPLES = "num-examples"  # the example count every train reply reports
RESIDUAL_KEY = "residual"  # strategy exact: the dense residual record beside the adapter
TRAIN_HEAD = "train-head"  # in the sites' config: whether local training updates the head
# In the sites' config: how many head-statistics releases the server has asked for so far
# (the latest included), so that a site's epsilon needs no state on the site.
HEAD_RELEASES = "head-releases"
# SecAgg+ speaks only train messages: a head-statistics request inside it says so here.
TASK_KEY = "fedlora-task"
# In a simulated site's evaluation reply: which partition it is (per-site comparisons); no
# metric to average.
PARTITION_ID = "partition-id"

INT8_SCALES_KEY = "int8-scales"  # transfer-dtype int8: every tensor's scales, in record order
_DTYPES = {"float32": torch.float32, "float16": torch.float16}


def adapter_to_record(state: Mapping[str, torch.Tensor], dtype: str = "float32") -> ArrayRecord:
    if dtype == "int8":
        return _int8_record(state)
    torch_dtype = _DTYPES[dtype]
    return ArrayRecord(OrderedDict(
        (name, Array.from_numpy_ndarray(tensor.detach().to("cpu", torch_dtype).numpy()))
        for name, tensor in state.items()))


def _int8_record(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    arrays: OrderedDict[str, Array] = OrderedDict()
    scales = []
    for name, tensor in state.items():
        values, tensor_scales = quantize(tensor.cpu())
        arrays[name] = Array.from_numpy_ndarray(values.numpy())
        scales.append(tensor_scales)
    # One array for all scales: a small array's own header would cost more than its values.
    arrays[INT8_SCALES_KEY] = Array.from_numpy_ndarray(torch.cat(scales).numpy())
    return ArrayRecord(arrays)


def record_to_tensors(record: ArrayRecord) -> "OrderedDict[str, torch.Tensor]":
    """Decode an ArrayRecord's arrays into tensors of the dtypes they hold; FedLoraError
    naming an array whose bytes are not exactly what its declared dtype and shape need."""
    return OrderedDict((name, torch.from_numpy(_decoded(name, array).copy()))
                       for name, array in record.items())


# The dtypes an adapter can travel as; a peer's bytes are never read as anything else.
_WIRE_DTYPES = {"float32", "float16", "float64", "int8", "int32", "int64"}


def _decoded(name: str, array: Array) -> np.ndarray:
    """The array's values, read only after its .npy header and byte length are checked
    against the dtype and shape the array declares (Flower's own decoding trusts the
    header, so a payload of other bytes would be cast and aggregated)."""
    declared_shape = tuple(int(d) for d in array.shape)
    if array.stype != "numpy.ndarray" or array.dtype not in _WIRE_DTYPES:
        raise FedLoraError(f"adapter tensor {name!r} declares {array.stype} of {array.dtype}, "
                           f"not a numpy array of {' or '.join(sorted(_WIRE_DTYPES))}")
    stream = io.BytesIO(array.data)
    try:
        version = np.lib.format.read_magic(stream)
        read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                       (2, 0): np.lib.format.read_array_header_2_0}[version]
        shape, fortran_order, dtype = read_header(stream)
    except Exception as err:  # a peer's bytes can fail the header parse in many ways
        raise FedLoraError(f"adapter tensor {name!r} cannot be decoded: "
                           f"{type(err).__name__}: {err}") from None
    if dtype != np.dtype(array.dtype) or tuple(shape) != declared_shape:
        raise FedLoraError(f"adapter tensor {name!r} declares {array.dtype} {declared_shape} "
                           f"but its bytes say {dtype} {tuple(shape)}")
    payload = memoryview(array.data)[stream.tell():]
    needed = math.prod(declared_shape) * dtype.itemsize
    if len(payload) != needed:
        raise FedLoraError(f"adapter tensor {name!r} holds {len(payload)} bytes of values where "
                           f"{array.dtype} {declared_shape} needs {needed}")
    return np.frombuffer(payload, dtype=dtype).reshape(
        declared_shape, order="F" if fortran_order else "C")


def record_to_adapter(record: ArrayRecord) -> "OrderedDict[str, torch.Tensor]":
    """Decode an ArrayRecord into float32 tensors (arithmetic on the server happens in fp32+);
    int8 tensors are dequantised with the record's scales."""
    state = record_to_tensors(record)
    scales = state.pop(INT8_SCALES_KEY, None)
    if scales is not None or any(t.dtype == torch.int8 for t in state.values()):
        return _dequantized(state, scales)
    return OrderedDict((name, t.to(torch.float32)) for name, t in state.items())


def _dequantized(state: "OrderedDict[str, torch.Tensor]", scales: torch.Tensor | None
                 ) -> "OrderedDict[str, torch.Tensor]":
    if scales is None or scales.dtype != torch.float32 or scales.dim() != 1:
        raise FedLoraError(f"int8 tensors need a 1-D float32 {INT8_SCALES_KEY!r} array")
    needed = sum(num_scales(t.shape) for t in state.values())
    if scales.numel() != needed or not torch.isfinite(scales).all():
        raise FedLoraError(f"{INT8_SCALES_KEY!r} holds {scales.numel()} values, the int8 "
                           f"tensors need {needed} finite ones")
    out, offset = OrderedDict(), 0
    for name, values in state.items():
        if values.dtype != torch.int8:
            raise FedLoraError(f"adapter tensor {name!r} is {values.dtype}, not int8 like the "
                               f"rest of the record")
        count = num_scales(values.shape)
        out[name] = dequantize(values, scales[offset:offset + count])
        offset += count
    return out


def check_adapter_matches(state: Mapping[str, torch.Tensor],
                          reference: Mapping[str, torch.Tensor], sender: str,
                          any_rank: bool = False) -> None:
    """Names and shapes of a received adapter must equal the local model's trainable tensors.
    With any_rank, LoRA factors may differ in their rank dimension (A's rows, B's columns)."""
    missing = [n for n in reference if n not in state]
    extra = [n for n in state if n not in reference]
    if missing or extra:
        detail = []
        if missing:
            detail.append(f"missing {len(missing)} tensor(s), e.g. {missing[0]!r}")
        if extra:
            detail.append(f"{len(extra)} unexpected tensor(s), e.g. {extra[0]!r}")
        raise FedLoraError(f"adapter from {sender} does not match the local model: "
                           f"{'; '.join(detail)} (same model, task, LoRA rank and targets?)")
    for name, tensor in state.items():
        expected = tuple(reference[name].shape)
        if any_rank and tensor.dim() == 2 and (".lora_A." in name or ".lora_B." in name):
            free = 0 if ".lora_A." in name else 1  # the rank dimension
            expected = tuple(tensor.shape[i] if i == free else expected[i] for i in range(2))
            partner = (name.replace(".lora_A.", ".lora_B.") if free == 0
                       else name.replace(".lora_B.", ".lora_A."))
            if partner in state and state[partner].dim() == 2 and \
                    state[partner].shape[1 - free] != tensor.shape[free]:
                raise FedLoraError(f"adapter from {sender}: the factors of {name!r} disagree "
                                   f"on their rank")
        if tuple(tensor.shape) != expected:
            raise FedLoraError(f"adapter from {sender}: tensor {name!r} has shape "
                               f"{tuple(tensor.shape)}, the local model expects {expected}")


def content_bytes(content: RecordDict) -> int:
    """Bytes of a message's content as serialised for the wire."""
    return recorddict_to_proto(content).ByteSize()


def message_bytes(messages) -> int:
    """Bytes of the messages' contents (error replies carry none)."""
    return sum(content_bytes(m.content) for m in messages if not m.has_error())


# -- Flower's legacy Parameters (what the SecAgg+ workflow and mod speak) -----------------------
ARRAY_NAMES_KEY = "fedlora-array-names"  # in the legacy config: the names Parameters lack
# In the legacy config: the names of the arrays the reply must hold (default: the request's),
# and whether they are sums over the site's rows (head statistics), which the site then sends
# per row, so that SecAgg+'s weighted mean is their total over sites divided by the rows.
REPLY_NAMES_KEY = "fedlora-reply-names"
REPLY_PER_ROW_KEY = "fedlora-reply-per-row"


def record_to_parameters(record: ArrayRecord) -> tuple[Parameters, list[str]]:
    """Legacy Parameters hold unnamed arrays in order: the names travel beside them."""
    return ndarrays_to_parameters(record.to_numpy_ndarrays()), list(record.keys())


def adapter_names(record_names: list[str]) -> list[str]:
    """The adapter tensors a record's names stand for (an int8 record adds its scales)."""
    return [name for name in record_names if name != INT8_SCALES_KEY]


def parameters_to_record(parameters: Parameters, names: list[str]) -> ArrayRecord:
    if len(parameters.tensors) != len(names):
        raise FedLoraError(f"{len(parameters.tensors)} arrays arrived for {len(names)} names")
    try:
        arrays = parameters_to_ndarrays(parameters)
    except Exception as err:  # np.load on a peer's bytes can raise many types
        raise FedLoraError(f"arrays cannot be decoded: {type(err).__name__}: {err}") from None
    return ArrayRecord(OrderedDict((name, Array.from_numpy_ndarray(array))
                                   for name, array in zip(names, arrays)))
