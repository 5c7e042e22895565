"""Reading RewriteCUDAGraph's result from a VM executable's text (no TVM needed)."""

from __future__ import annotations

from llmc.targets.tvm.graphs import graph_coverage

TEXT = """@decode_b1:
  call  vm.builtin.check_tensor_info in: %4, i1, c[0], c[13] dst: %void
  call  vm.builtin.cuda_graph.run_or_capture in: %vm, f[decode_b1_cuda_graph_capture], %32, i0, %31 dst: %33
  call  vm.builtin.tuple_getitem in: %33, i0      dst: %34
  call  matmul_lm_head1  in: %34, %21, %36 dst: %void
  ret   %36

@vm.builtin.cuda_graph.run_or_capture packed_func;

@decode_b1_cuda_graph_capture:
  call  vm.builtin.alloc_shape_heap in: %vm, i2      dst: %25
  call  take1            in: %0, %1, %2   dst: %void
  call  tir_kv_cache_transpose_append in: %12, %32, %33, %13 dst: %void
  call  batch_decode_paged_kv in: %31, %12, %14, %15, %16, %11, %11, %35, %36 dst: %void
  ret   %40

@prefill:
  call  take3            in: %0, %1, %2   dst: %void
  ret   %3
"""


def test_graph_coverage_splits_captured_and_outside_kernels() -> None:
    cov = graph_coverage(TEXT, ["decode_b1", "prefill", "missing"])
    assert cov["decode_b1"].graphs == [["take1", "tir_kv_cache_transpose_append", "batch_decode_paged_kv"]]
    assert cov["decode_b1"].outside == ["matmul_lm_head1"]
    assert cov["decode_b1"].to_dict() == {"graphs": 1, "captured_kernel_calls": 3, "outside": ["matmul_lm_head1"]}
    assert cov["prefill"].graphs == [] and cov["prefill"].outside == ["take3"]
    assert cov["missing"].to_dict() == {"graphs": 0, "captured_kernel_calls": 0, "outside": []}
