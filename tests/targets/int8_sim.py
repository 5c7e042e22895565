"""A NumPy simulation of ONNX Runtime's int8-activation MatMulNBits (``accuracy_level=4``), to
judge the onnx target's level-4 results by the arithmetic instead of by one machine's numbers.

MLAS quantizes each row of the activations per block of ``block_size`` (the weights' group) to int8:
``scale = amax / 127``, ``q = round_half_even(x * (127 / amax))``, then takes integer dot products
with the weight codes and multiplies by both scales (checked against ONNX Runtime op by op in
tests/targets/test_onnx_int8.py). The offsets of asymmetric weights are added by llmc's graph
from the float activations, as :mod:`llmc.targets.onnx.quant` lowers them.

Rounding to int8 is discontinuous, so a model's perplexity under int8 activations is chaotic: an
fp32-level change upstream (another CPU's summation order or FMA use, AVX2 against AVX-512) moves
some activations across a rounding boundary and the perplexity by a few tenths of a percent.
:func:`int8_ensemble` measures that spread by running the simulation under perturbations of one
fp32 rounding (relative 2^-24) of every matmul input.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from llmc.compiler.ir import interp as interp_module
from llmc.compiler.weights import QuantizedTensor
from llmc.runtime.artifact import Artifact
from llmc.runtime.evaluate import EvalResult, score
from llmc.targets.onnx.quant import matmulnbits_ok
from tests.helpers import interpret

FP32_ROUNDING = 2.0**-24


def quantize_activations(x: np.ndarray, block: int) -> np.ndarray:
    """``x [rows, k]`` after MLAS's per-block symmetric int8 quantization (dequantized back, float32)."""
    rows, k = x.shape
    blocks = -(-k // block)
    padded = np.zeros((rows, blocks * block), np.float32)
    padded[:, :k] = x
    grouped = padded.reshape(rows, blocks, block)
    amax = np.abs(grouped).max(axis=2, keepdims=True)
    scale = amax / np.float32(127)
    inverse = np.divide(np.float32(127), amax, out=np.zeros_like(amax), where=amax > 0)
    codes = np.rint(grouped * inverse)  # round half to even, as _mm256/_mm512 round-to-nearest
    return (codes * scale).reshape(rows, -1)[:, :k]


def uses_int8_activations(weight: object, accuracy_level: int) -> bool:
    """Whether the onnx target lowers this weight's linear to MatMulNBits with int8 activations."""
    return (accuracy_level == 4 and isinstance(weight, QuantizedTensor) and matmulnbits_ok(weight.spec)
            and weight.spec.bits in (4, 8))


def _int8_linear(accuracy_level: int, rng: np.random.Generator | None):  # type: ignore[no-untyped-def]
    def kernel(interp, node, args, layout):  # type: ignore[no-untyped-def]
        x, w = args
        weight = interp.weights[str(node.inputs[1].node.attrs["name"])]
        if not uses_int8_activations(weight, accuracy_level):
            return x @ w.T
        x32 = x.astype(np.float32)
        if rng is not None:
            x32 = (x32 * (1 + FP32_ROUNDING * rng.standard_normal(x32.shape))).astype(np.float32)
        xq = quantize_activations(x32, weight.spec.group_size).astype(x.dtype)
        if weight.offsets is None:
            return xq @ w.T
        offsets = np.repeat(weight.offsets.astype(x.dtype), weight.spec.group_size, axis=1)[:, : w.shape[1]]
        return xq @ (w - offsets).T + x @ offsets.T  # the graph adds the offsets from float activations

    return kernel


@contextmanager
def _linear_kernel(kernel) -> Iterator[None]:  # type: ignore[no-untyped-def]
    saved = interp_module.KERNELS["linear"]
    interp_module.KERNELS["linear"] = kernel
    try:
        yield
    finally:
        interp_module.KERNELS["linear"] = saved


def _scored(artifact: Artifact, ids: list[int], kernel, reference: np.ndarray | None) -> EvalResult:  # type: ignore[no-untyped-def]
    with _linear_kernel(kernel):
        logits = interpret(artifact.module, artifact.weights(), [{0: ids}], dtype=np.float32)[0][0]
    positions = range(1, len(ids))
    ref = None if reference is None else iter([(p, reference[p - 1]) for p in positions])
    return score(((p, logits[p - 1]) for p in positions), ids, ref)


def int8_ensemble(path: Path, ids: list[int], accuracy_level: int, members: int = 16) -> list[EvalResult]:
    """The simulated level-``accuracy_level`` results of the onnx artifact at ``path`` on ``ids`` (one
    prefill), against the float-activation result as the KL reference: the exact simulation first, then
    ``members - 1`` runs under fp32-rounding perturbations (seeded)."""
    artifact = Artifact.load(path)
    with _linear_kernel(lambda i, n, a, _: a[0] @ a[1].T):
        float_logits = interpret(artifact.module, artifact.weights(), [{0: ids}], dtype=np.float32)[0][0]
    results = [_scored(artifact, ids, _int8_linear(accuracy_level, None), float_logits)]
    for seed in range(1, members):
        results.append(_scored(artifact, ids, _int8_linear(accuracy_level, np.random.default_rng(seed)),
                               float_logits))
    return results
