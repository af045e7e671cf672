"""int8 adapter transfer: each tensor as 8-bit integers with one float32 scale (absmax / 127)
per slice along its smaller dimension: a LoRA A's rows, a LoRA B's columns (one per rank
component either way), a classification head's rows; a vector gets one scale. That keeps the
scales to ~2% of the values, so int8 costs about a quarter of float32 on the wire."""

from __future__ import annotations

import torch

LEVELS = 127  # symmetric: -127..127, so 0 stays exactly 0 (B starts at zero)


def _reduce_dim(shape: torch.Size) -> int | None:
    """The dimension a scale spans: the larger of a matrix's two; None = the whole tensor."""
    if len(shape) != 2:
        return None
    return 1 if shape[0] <= shape[1] else 0


def num_scales(shape: torch.Size) -> int:
    dim = _reduce_dim(shape)
    return 1 if dim is None else shape[1 - dim]


def quantize(tensor: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(int8 values, float32 scales flattened); dequantize(q, s) is within s/2 of tensor."""
    tensor = tensor.detach().float()
    dim = _reduce_dim(tensor.shape)
    absmax = tensor.abs().amax() if dim is None else tensor.abs().amax(dim=dim, keepdim=True)
    scales = torch.where(absmax > 0, absmax / LEVELS, torch.ones_like(absmax))
    values = torch.round(tensor / scales).clamp(-LEVELS, LEVELS).to(torch.int8)
    return values, scales.flatten()


def dequantize(values: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    dim = _reduce_dim(values.shape)
    if scales.numel() != num_scales(values.shape):
        raise ValueError(f"{scales.numel()} scales for a tensor of shape "
                         f"{tuple(values.shape)}, which needs {num_scales(values.shape)}")
    if dim is not None:
        scales = scales.reshape((-1, 1) if dim == 1 else (1, -1))
    return values.float() * scales.float()
