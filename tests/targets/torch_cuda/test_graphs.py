"""The decode buckets' host side and static buffers (device-independent: CPU tensors here, the GPU's too)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmc.compiler.errors import LlmcError, RequestError
from llmc.compiler.ir.batch import BatchLayout
from llmc.runtime.executor import StepBatch
from llmc.targets.torch.cuda.graphs import BUCKETS, DecodeGraphs, StaticDecodeBuffers, bucket_for, host_decode_inputs

BS, WIDTH, SCRATCH = 4, 6, 99


def _decode(context_lens: list[int], tables: list[list[int]], deferred: dict[int, int] | None = None) -> StepBatch:
    n = len(context_lens)
    ids = np.arange(10, 10 + n)
    rows, src = zip(*deferred.items(), strict=True) if deferred else ((), ())
    ids[list(rows)] = -1
    return StepBatch(ids, BatchLayout(tuple(range(n)), (1,) * n, tuple(context_lens)), tables, np.arange(n),
                     np.asarray(rows, dtype=np.int64), np.asarray(src, dtype=np.int64))


def test_bucket_for_is_the_smallest_bucket_that_holds_the_batch() -> None:
    assert BUCKETS[0] == 1 and BUCKETS[-1] == 256 and list(BUCKETS) == sorted(set(BUCKETS))
    for n in range(1, 257):
        b = bucket_for(n)
        assert b is not None and b >= n
        smaller = [x for x in BUCKETS if x < b]
        assert not smaller or smaller[-1] < n
    assert bucket_for(257) is None
    assert bucket_for(3, (2, 8)) == 8
    with pytest.raises(ValueError, match="at least one"):
        bucket_for(0)


def test_host_inputs_pad_to_the_bucket_on_the_scratch_block() -> None:
    tables = [[7, 3], [5], [1, 2, 8]]
    inputs = host_decode_inputs(_decode([6, 1, 9], tables), 8, BS, WIDTH, SCRATCH, max_position=64)
    assert inputs.n == 3 and inputs.bucket == 8
    np.testing.assert_array_equal(inputs.positions, [5, 0, 8, 0, 0, 0, 0, 0])
    np.testing.assert_array_equal(inputs.context_lens, [6, 1, 9, 1, 1, 1, 1, 1])
    np.testing.assert_array_equal(inputs.token_ids, [10, 11, 12, 0, 0, 0, 0, 0])
    # each new token's slot: its block (through the table) * block size + offset; padding: the scratch slot
    np.testing.assert_array_equal(inputs.slot_mapping, [3 * BS + 1, 5 * BS + 0, 8 * BS + 0] + [SCRATCH * BS] * 5)
    assert inputs.block_tables.shape == (8, 3)  # the columns the step reads: the widest context's 3 blocks
    np.testing.assert_array_equal(inputs.block_tables[0], [7, 3, SCRATCH])
    np.testing.assert_array_equal(inputs.block_tables[2], [1, 2, 8])
    assert (inputs.block_tables[3:] == SCRATCH).all()


def test_host_inputs_copy_the_tables_at_launch() -> None:
    tables = [[7, 3]]
    batch = _decode([6], tables)
    inputs = host_decode_inputs(batch, 1, BS, WIDTH, SCRATCH, 64)
    tables[0][1] = 42  # the runtime grows or reuses tables after launch
    assert inputs.block_tables[0, 1] == 3


def test_host_inputs_refuse_what_does_not_fit() -> None:
    with pytest.raises(LlmcError, match="sequence 0 has 1 blocks for 6 tokens"):
        host_decode_inputs(_decode([6], [[7]]), 1, BS, WIDTH, SCRATCH, 64)
    with pytest.raises(LlmcError, match="more than the 6"):
        host_decode_inputs(_decode([30], [list(range(8))]), 1, BS, WIDTH, SCRATCH, 64)
    with pytest.raises(RequestError, match="beyond the context of 8"):
        host_decode_inputs(_decode([9], [[1, 2, 3]]), 1, BS, WIDTH, SCRATCH, 8)
    with pytest.raises(ValueError, match="do not fit a bucket"):
        host_decode_inputs(_decode([1, 1], [[1], [2]]), 1, BS, WIDTH, SCRATCH, 64)
    prefill = StepBatch(np.arange(3), BatchLayout((0,), (3,), (3,)), [[1]], np.asarray([2]))
    with pytest.raises(ValueError, match="decode steps"):
        host_decode_inputs(prefill, 1, BS, WIDTH, SCRATCH, 64)


def test_static_buffers_keep_their_addresses_and_fill_deferred_tokens_on_the_device() -> None:
    buffers = StaticDecodeBuffers(4, WIDTH, torch.device("cpu"))
    addresses = {name: getattr(buffers, name).data_ptr() for name in buffers.NAMES}
    previous = torch.tensor([70, 71, 72])  # the tokens the step before sampled, per logits row
    batch = _decode([6, 1, 9], [[7, 3], [5], [1, 2, 8]], deferred={0: 2, 2: 0})
    inputs = host_decode_inputs(batch, 4, BS, WIDTH, SCRATCH, 64)
    buffers.load(inputs, previous)
    assert buffers.token_ids.tolist() == [72, 11, 70, 0]
    for name in ("positions", "context_lens", "slot_mapping"):
        np.testing.assert_array_equal(getattr(buffers, name).numpy(), getattr(inputs, name))
    np.testing.assert_array_equal(buffers.block_tables[:, :3].numpy(), inputs.block_tables)
    narrow = host_decode_inputs(_decode([2], [[4]]), 4, BS, WIDTH, SCRATCH, 64)  # one column: the rest stay
    buffers.load(narrow, None)
    assert buffers.block_tables[:, 0].tolist() == [4, SCRATCH, SCRATCH, SCRATCH]
    np.testing.assert_array_equal(buffers.block_tables[:, 1:3].numpy(), inputs.block_tables[:, 1:])
    assert {name: getattr(buffers, name).data_ptr() for name in buffers.NAMES} == addresses
    with pytest.raises(LlmcError, match="previous step"):
        buffers.load(inputs, None)
    with pytest.raises(ValueError, match="do not fit"):
        StaticDecodeBuffers(8, WIDTH, torch.device("cpu")).load(inputs, previous)


def test_graphs_without_capture_run_the_step_on_each_buckets_buffers() -> None:
    seen = []

    def forward(buffers: StaticDecodeBuffers) -> torch.Tensor:
        seen.append(buffers.bucket)
        return buffers.token_ids[:, None].float()

    graphs = DecodeGraphs(forward, WIDTH, torch.device("cpu"), capture=False)
    assert graphs.buffers_for(8) is graphs.buffers_for(8)
    graphs.buffers_for(8).token_ids.fill_(5)
    assert graphs.run(8).shape == (8, 1) and graphs.run(2).shape == (2, 1) and seen == [8, 2]
    with pytest.raises(LlmcError, match="CUDA graphs need a CUDA device"):
        DecodeGraphs(forward, WIDTH, torch.device("cpu"), capture=True)
