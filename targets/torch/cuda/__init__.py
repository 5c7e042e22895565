"""The torch target on CUDA GPUs: Triton kernels, CUDA-graph decode buckets and sampling on the device.

- :mod:`.norm`, :mod:`.qmatmul`, :mod:`.attention`: Triton kernels (fused residual + RMSNorm, fused
  dequantize-matmul over llmc's int4/int8 layouts, KV-cache writes and paged decode attention with
  RoPE inside), each beside the torch reference it is tested against (under ``TRITON_INTERPRET=1`` on a
  CPU, ``tests/targets/torch_cuda/``).
- :mod:`.lowering`: the decode program's op table (the torch target's lowering with those kernels in
  place of torch's); prefill and mixed steps keep the torch target's own programs.
- :mod:`.graphs`: batch buckets, the static inputs of a decode step and its CUDA graphs.
- :mod:`.sampling`: penalties, temperature, top-k/top-p/min-p and the inverse-CDF draw on the device,
  the host's uniforms in, token ids out (the same function as :func:`llmc.runtime.sampling.sample_batch`).
- :mod:`.executor`: :class:`~.executor.CudaTorchExecutor`, which the torch target loads for ``cuda``.

Nothing here is imported for the CPU path. docs/gpu.md describes the whole path and how it is measured.
"""
