"""Torch-side weights: plain tensors and group-quantized weights kept packed in memory."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from llmc.compiler.ggml_blocks import decode
from llmc.compiler.packing import unpack_codes
from llmc.compiler.weights import QuantizedTensor, Weight
from llmc.targets.torch import qkernels

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


INT8PACK_MAX_ROWS = 8
"""Above this many rows ``linear`` dequantizes an int8 weight once instead of calling
``_weight_int8pack_mm`` (measured on a 2-core AVX2 EPYC with torch 2.13: the kernel is ~40x
slower than float32 ``F.linear`` at 256 rows; benchmarks/quant_kernels.py)."""


def release_transients_to_os(threshold: int = 1 << 20) -> bool:
    """Make glibc serve allocations >= ``threshold`` bytes with mmap, returned to the OS on free.

    Per-layer dequantization allocates a float copy of each weight on every call. glibc raises
    its mmap threshold after such blocks are freed (up to 32 MiB), after which they come from
    the heap and fragmentation keeps them resident: measured on SmolLM2-135M int8, peak RSS
    went from 0.50 to 1.06 GB after one 16-token prefill. A fixed threshold keeps it at 0.52 GB.
    Returns False where this is not glibc (then nothing changes).
    """
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def int4pack_is_fast() -> bool:
    """torch's CPU int4 kernel is vectorized for AVX512; on AVX2 it is slower than dequantizing."""
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


class PackedWeight:
    """A quantized ``[out, in]`` weight kept packed: llmc's group layout or GGUF blocks.

    Values are ``scale * (q - zero)`` (symmetric) or ``scale * q + offset`` with a scale per group
    of inputs (:class:`~llmc.compiler.ir.types.QuantSpec`; GGUF blocks are decoded to this form
    exactly, :mod:`llmc.compiler.ggml_blocks`). On CPU with ``cpu_kernel`` set and float32 inputs,
    :meth:`linear` runs llmc's int8-activation kernels (targets/torch/qkernels.py) on a kernel
    layout built once (the packed form is then dropped); otherwise the weight is dequantized one
    layer at a time.
    """

    def __init__(self, qt: QuantizedTensor, device: torch.device) -> None:
        self.spec = qt.spec
        self.shape = qt.shape
        self.device = device
        fmt = qt.ggml_format
        self._pending: QuantizedTensor | None = None
        if fmt is not None:  # GGUF blocks: decoded on first use (one weight at a time, not all at load)
            self._pending = qt
            self.qdata = self.scales = torch.empty(0, dtype=torch.uint8, device=device)
            self.offsets = None
            self.group, self.zero, self.code_bits, self._codes_unpacked = fmt.sub, fmt.zero or 0, fmt.bits, True
            self.zero_point = float(self.zero)
        else:
            self.zero_point = float(qt.layout.zero_point)
            self.qdata = numpy_to_torch(qt.qdata).to(device)
            self.scales = numpy_to_torch(qt.scales).to(device)
            self.offsets = None if qt.offsets is None else numpy_to_torch(qt.offsets).to(device)
            self.group, self.code_bits = qt.spec.group_size, qt.spec.bits
            self.zero = int(self.zero_point) if qt.spec.symmetric else 0
            self._codes_unpacked = qt.spec.bits == 8
        self._raw = True  # the packed form above is still held
        self._int8: torch.Tensor | None = None
        self._scale32: torch.Tensor | None = None
        self._int4: torch.Tensor | None = None
        self._scale_zeros: torch.Tensor | None = None
        self.cpu_kernel = True  # llmc's int8-activation kernels (the executor clears it unless quant_kernels=auto)
        self._kernel: Any = None

    def _decode_pending(self) -> None:
        """GGUF blocks as unsigned codes (one per byte) and sub-block scales (:mod:`llmc.compiler.ggml_blocks`)."""
        qt, self._pending = self._pending, None
        if qt is None:
            return
        fmt = qt.ggml_format
        assert fmt is not None
        decoded = decode(qt.qdata, fmt, qt.shape)
        self.qdata = numpy_to_torch(decoded.codes).to(self.device)
        self.scales = numpy_to_torch(decoded.scales).to(self.device)
        self.offsets = None if decoded.offsets is None else numpy_to_torch(decoded.offsets).to(self.device)

    @property
    def nbytes(self) -> int:
        if self._pending is not None:
            return self._pending.nbytes
        extra = 0 if self.offsets is None else self.offsets.numel() * self.offsets.element_size()
        return self.qdata.numel() + self.scales.numel() * self.scales.element_size() + extra

    def _codes(self, qdata: torch.Tensor) -> torch.Tensor:
        if self._codes_unpacked:
            return qdata
        return unpack_codes(qdata, self.spec.bits, torch.stack)

    def dequantize(self, dtype: torch.dtype, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The float weight (or only ``rows`` of it), computed in float32 then cast."""
        if self._kernel is not None and not self._raw:
            ids = torch.arange(self.shape[0]) if rows is None else rows.cpu()
            return self._kernel.rows(ids).to(dtype)
        if not self._raw and self._int8 is not None and self._scale32 is not None:
            codes8, s8 = (self._int8, self._scale32) if rows is None else (self._int8[rows], self._scale32[rows])
            return (codes8.to(torch.float32) * s8.unsqueeze(-1)).to(dtype)  # exact: s * (q - 128)
        if not self._raw:
            raise RuntimeError("this packed weight was converted for a matmul kernel and cannot be dequantized")
        self._decode_pending()
        qdata, scales, offsets = self.qdata, self.scales, self.offsets
        if rows is not None:
            qdata, scales = qdata[rows], scales[rows]
            offsets = None if offsets is None else offsets[rows]
        codes = self._codes(qdata)
        inp, group = self.shape[1], self.group
        s = scales.to(torch.float32)
        if inp % group == 0:  # whole groups: broadcast scales over [..., groups, group] (no repeat)
            g = codes.reshape(*codes.shape[:-1], inp // group, group)
            if offsets is None:
                w = (g.to(torch.int16) - self.zero).to(torch.float32).mul_(s.unsqueeze(-1))
            else:
                w = g.to(torch.float32).mul_(s.unsqueeze(-1)).add_(offsets.to(torch.float32).unsqueeze(-1))
            return w.reshape(codes.shape).to(dtype)
        s = s.repeat_interleave(group, dim=-1)[..., :inp]
        if offsets is None:
            w = s * (codes.to(torch.int16) - self.zero).to(torch.float32)
        else:
            w = s * codes.to(torch.float32) + offsets.to(torch.float32).repeat_interleave(group, dim=-1)[..., :inp]
        return w.to(dtype)

    # -- low-precision matmul kernels ---------------------------------------------------
    def kernel_name(self, int4pack: bool = True) -> str:
        """Which of torch's matmuls :meth:`prepare_linear` would use: ``int8pack``, ``int4pack`` or
        ``dequant`` (``int4pack=False``: never the int4 kernel; GGUF blocks: always ``dequant``)."""
        out, inp = self.shape
        if self.device.type != "cpu" or self.spec.ggml is not None:
            return "dequant"
        if self.spec.bits == 8 and self.spec.symmetric and self.spec.group_size >= inp:
            return "int8pack"
        g = self.spec.group_size
        if int4pack and self.spec.bits == 4 and g in (32, 64, 128, 256) and inp % g == 0 and out % 16 == 0:
            return "int4pack"
        return "dequant"

    def prepare_linear(self, int4pack: bool = True) -> None:
        """Convert to the layout of torch's CPU weight-only kernels, dropping the llmc layout.

        int8 (per output channel, symmetric): ``w = s * (q - 128)`` is ``s * int8(q - 128)``,
        exact. int4: torch computes ``(q - 8) * scale + zero``; llmc's ``s * (q - 8)`` gives
        ``zero = 0`` (exact) and ``s * q + offset`` gives ``zero = offset + 8 * s`` (float32).
        Weights the kernels cannot take (shapes, ragged groups) keep on-the-fly dequantization.
        """
        kind = self.kernel_name(int4pack)
        if kind == "int8pack" and self._int8 is None:
            self._int8 = (self.qdata.view(torch.int8) ^ -128).contiguous()  # q - 128 as int8
            self._scale32 = self.scales.to(torch.float32).reshape(-1).contiguous()
            self._drop_raw()
        elif kind == "int4pack" and self._int4 is None:
            codes = self._codes(self.qdata).to(torch.int32)
            s = self.scales.to(torch.float32)
            zero = torch.zeros_like(s) if self.offsets is None else self.offsets.to(torch.float32) + self.zero_point * s
            self._int4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.contiguous(), 1)
            self._scale_zeros = torch.stack((s.T, zero.T), dim=-1).contiguous()  # [groups, out, 2]
            self._drop_raw()

    def _drop_raw(self) -> None:
        empty = lambda t: torch.empty(0, dtype=t.dtype, device=t.device)  # frees the storage
        self.qdata, self.scales = empty(self.qdata), empty(self.scales)
        self.offsets = None if self.offsets is None else empty(self.offsets)
        self._raw = False

    @property
    def resident_bytes(self) -> int:
        """Bytes this weight holds in memory now (kernel layouts or the packed form)."""
        total = self.nbytes + (0 if self._kernel is None else int(self._kernel.nbytes))
        for t in (self._int8, self._scale32, self._int4, self._scale_zeros):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    def kernel_supported(self) -> bool:
        """Whether llmc's CPU kernels take this weight's groups (16, a multiple of 32 inputs, or one per row)."""
        return qkernels.kernel_group_ok(self.group, self.shape[1])

    def prepare_cpu_kernel(self) -> bool:
        """Build the kernel layout (once) and drop the packed form; False where it does not apply."""
        if self._kernel is not None:
            return True
        if (not self._raw or not self.cpu_kernel or self.device.type != "cpu" or not self.kernel_supported()
                or not qkernels.available()):
            return False
        self._decode_pending()
        self._kernel = qkernels.kernel_weight(self._codes(self.qdata), self.scales, self.offsets, self.group,
                                              self.zero, 2 ** self.code_bits - 1)
        self._drop_raw()
        return True

    @property
    def kernel(self) -> Any:
        """The :func:`~llmc.targets.torch.qkernels.kernel_weight` of this weight, or None before
        :meth:`prepare_cpu_kernel` (or where the kernels do not apply)."""
        return self._kernel

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """``x @ w.T`` with a low-precision kernel when prepared, else dequantizing this layer."""
        if x.dtype == torch.float32 and x.device.type == "cpu" and self.cpu_kernel and self.prepare_cpu_kernel():
            return self._kernel.linear(x)
        if self._int8 is not None and self._scale32 is not None and x.dtype == torch.float32:
            if x.shape[0] > INT8PACK_MAX_ROWS:  # prefill: one dequantization beats the GEMV kernel
                return torch.nn.functional.linear(x, self.dequantize(torch.float32))
            return torch._weight_int8pack_mm(x.contiguous(), self._int8, self._scale32)
        if self._int4 is not None and self._scale_zeros is not None and x.dtype == torch.float32:
            return torch._weight_int4pack_mm_for_cpu(x.contiguous(), self._int4, self.spec.group_size,
                                                     self._scale_zeros)
        if not self._raw and self._kernel is None:
            raise RuntimeError("packed weight was converted for float32 kernels; input is " + str(x.dtype))
        return torch.nn.functional.linear(x, self.dequantize(x.dtype))


TorchWeight = torch.Tensor | PackedWeight


def linear(x: torch.Tensor, weight: TorchWeight) -> torch.Tensor:
    """``x @ weight.T`` for a plain or packed weight."""
    if isinstance(weight, PackedWeight):
        return weight.linear(x)
    return torch.nn.functional.linear(x, weight if weight.dtype == x.dtype else weight.to(x.dtype))


def to_torch_weight(weight: Weight, device: torch.device) -> TorchWeight:
    if isinstance(weight, QuantizedTensor):
        return PackedWeight(weight, device)
    return numpy_to_torch(np.asarray(weight)).to(device)


def float_weight(weight: TorchWeight, dtype: torch.dtype) -> torch.Tensor:
    """The weight as a float tensor of ``dtype`` (dequantizing if packed)."""
    if isinstance(weight, PackedWeight):
        return weight.dequantize(dtype)
    return weight if weight.dtype == dtype else weight.to(dtype)
