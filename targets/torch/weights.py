"""Torch-side weights: plain tensors and group-quantized weights kept packed in memory."""

from __future__ import annotations

import numpy as np
import torch

from llmc.compiler.weights import QuantizedTensor, Weight

TORCH_DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}


def numpy_to_torch(array: np.ndarray) -> torch.Tensor:
    """A torch tensor sharing or copying ``array`` (bfloat16 via its bit pattern)."""
    array = np.ascontiguousarray(array)
    if array.dtype.name == "bfloat16":
        return torch.from_numpy(array.view(np.int16)).view(torch.bfloat16)
    if not array.flags.writeable:
        array = array.copy()
    return torch.from_numpy(array)


class PackedWeight:
    """A quantized ``[out, in]`` weight kept packed; dequantized one layer at a time.

    ``w = scale * (q - 2**(bits-1))`` (symmetric) or ``w = scale * q + offset``.
    """

    def __init__(self, qt: QuantizedTensor, device: torch.device) -> None:
        self.spec = qt.spec
        self.shape = qt.shape
        self.qdata = numpy_to_torch(qt.qdata).to(device)
        self.scales = numpy_to_torch(qt.scales).to(device)
        self.offsets = None if qt.offsets is None else numpy_to_torch(qt.offsets).to(device)

    @property
    def nbytes(self) -> int:
        extra = 0 if self.offsets is None else self.offsets.numel() * self.offsets.element_size()
        return self.qdata.numel() + self.scales.numel() * self.scales.element_size() + extra

    def _codes(self, qdata: torch.Tensor) -> torch.Tensor:
        if self.spec.bits == 8:
            return qdata
        low, high = qdata & 0x0F, qdata >> 4
        return torch.stack((low, high), dim=-1).reshape(*qdata.shape[:-1], qdata.shape[-1] * 2)

    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (or only ``rows`` of it), computed in float32 then cast."""
        qdata, scales, offsets = self.qdata, self.scales, self.offsets
        if rows is not None:
            qdata, scales = qdata[rows], scales[rows]
            offsets = None if offsets is None else offsets[rows]
        codes = self._codes(qdata).to(torch.float32)
        inp, group = self.shape[1], self.spec.group_size
        s = scales.to(torch.float32).repeat_interleave(group, dim=-1)[..., :inp]
        if offsets is None:
            w = s * (codes - float(2 ** (self.spec.bits - 1)))
        else:
            w = s * codes + offsets.to(torch.float32).repeat_interleave(group, dim=-1)[..., :inp]
        return w.to(dtype)


TorchWeight = torch.Tensor | PackedWeight


def to_torch_weight(weight: Weight, device: torch.device) -> TorchWeight:
    if isinstance(weight, QuantizedTensor):
        return PackedWeight(weight, device)
    return numpy_to_torch(np.asarray(weight)).to(device)


def float_weight(weight: TorchWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a float tensor of ``dtype`` (dequantizing if packed)."""
    if isinstance(weight, PackedWeight):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)
