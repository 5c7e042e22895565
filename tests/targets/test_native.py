"""The torch target's native step program (targets/torch/native.py, csrc/qk_program.cpp) against
the same executor running torch ops per IR op, on the same quantized weights.

Both paths run every matmul on llmc's int8-activation kernels (identical integer arithmetic);
they differ only in the float32 ops around them (RMSNorm, RoPE, SiLU, softmax, attention sums),
which round differently (the native attention fuses its multiply-adds where the ISA has FMA):
logits agree to about 1e-7 relative (L2). Now and then such a last-bit difference moves an
activation across an int8 rounding boundary (x / d at k + 1/2): that value then differs by one
step d, which moves the outputs by about d * |w| in one term of one block, and the layers after
it carry that on, to every later row of a prefill chunk through attention (measured: up to 7.3e-3
relative L2 for the step where it happened; the other steps stay at 1e-7). Hence the checks: per
step at most 1e-2 relative L2, in at least half the steps half the rows within 1e-5, and both
paths within the int8 activations' error of the float computation. These parity checks run the
native program on a float32 KV cache; its default float16 cache is checked against float
attention in tests/targets/test_native_attention.py and, end to end, within the int8
activations' error here.
"""

from __future__ import annotations

import weakref

import numpy as np
import pytest
import torch

from llmc.compiler.ggml_blocks import FORMATS
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor
from llmc.errors import LlmcError, RequestError
from llmc.targets.torch import qkernels
from llmc.targets.torch.executor import TorchExecutor
from llmc.targets.torch.native import Unsupported, linears_together, lower_native
from tests.helpers import SequenceDriver, assert_int8_activation_close, int8_activation_error
from tests.passes.util import llama_config, random_llama, run_pipeline
from tests.targets.test_qkernels import random_blocks

PIPELINES = [
    "quantize(int4,group=32)",  # O0: separate q/k/v, rope inside attention ops
    "fuse-qkv,fuse-gate-up,fuse-add-rmsnorm,fold-rope,dce,quantize(int4,group=32)",
    "fuse-qkv,fuse-add-rmsnorm,fold-rope,dce,quantize(int8)",
    "fuse-qkv,fuse-add-rmsnorm,fold-rope,pack-qkv-attention,dce,quantize(int4,group=32,sym=true)",
]


@pytest.fixture(scope="module")
def kernels() -> None:
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc CPU kernels could not be built here (no C++ compiler/ninja) or are disabled")


def schedule(driver: SequenceDriver, vocab: int, seed: int) -> list[np.ndarray]:
    """Three sequences: ragged prefills (one chunked), then decode steps mixed with a new prompt."""
    rng = np.random.default_rng(seed)
    ids = lambda n: [int(t) for t in rng.integers(0, vocab, n)]
    out = [np.concatenate(driver.step({0: ids(21), 1: ids(3)}))]
    out.append(np.concatenate(driver.step({0: ids(1), 1: ids(1), 2: ids(17)})))
    for _ in range(3):
        out.append(np.concatenate(driver.step({0: ids(1), 1: ids(1), 2: ids(1)})))
    out.append(np.concatenate(driver.step({1: ids(40)})))  # a long chunk after the past
    return out


def model(pipeline: str, seed: int = 3, **config: object) -> tuple:
    cfg = llama_config(**{"hidden": 64, "inter": 128, "vocab": 96, "heads": 4, "kv_heads": 2, "head_dim": 16,
                          **config})
    module, weights = random_llama(cfg, seed=seed)
    module, _ = run_pipeline(module, weights, pipeline)
    return cfg, module, weights


def assert_close(got: list[np.ndarray], want: list[np.ndarray]) -> None:
    medians = []
    for a, b in zip(want, got, strict=True):
        assert int8_activation_error(b, a) <= 1e-2
        medians.append(np.median([int8_activation_error(y, x) for x, y in zip(a, b, strict=True)]))
    assert sum(m <= 1e-5 for m in medians) >= len(medians) / 2, medians


def assert_native_matches(module, weights, vocab: int, seed: int, against_float: bool = True,
                          **options: object) -> None:
    native = TorchExecutor(module, weights, kv_cache_dtype="float32", **options)  # type: ignore[arg-type]
    assert native.native is not None and native.native_reason is None
    got = schedule(SequenceDriver(native, max_seqs=3), vocab, seed)
    ops = schedule(SequenceDriver(TorchExecutor(module, weights, step="ops", **options), max_seqs=3), vocab, seed)
    float_ops = schedule(SequenceDriver(TorchExecutor(module, weights, step="ops", quant_kernels="dequant",
                                                      **options), max_seqs=3), vocab, seed)  # type: ignore[arg-type]
    assert_close(got, ops)
    for a, b in zip(float_ops, got, strict=True) if against_float else ():
        assert_int8_activation_close(b, a)


@pytest.mark.parametrize("pipeline", PIPELINES)
def test_native_steps_match_the_torch_ops(kernels, pipeline: str) -> None:
    cfg, module, weights = model(pipeline)
    assert TorchExecutor(module, weights).block_major
    ops = TorchExecutor(module, weights, step="ops")
    assert ops.native is None and ops.native_reason == "step=ops"
    assert_native_matches(module, weights, cfg.vocab_size, seed=1)


@pytest.mark.parametrize("rope_style", ["half", "interleaved"])
def test_rope_styles_tied_head_and_a_block_size_that_is_not_16(kernels, rope_style: str) -> None:
    cfg, module, weights = model("share-tied-weights,fuse-qkv,fold-rope,dce,quantize(int8)", tied=True,
                                 rope_style=rope_style, heads=6, kv_heads=2, head_dim=8)
    for block_size in (16, 8):
        assert TorchExecutor(module, weights, block_size=block_size).block_major == (block_size == 16)
        assert_native_matches(module, weights, cfg.vocab_size, seed=2, block_size=block_size)


def test_gguf_blocks_run_natively(kernels) -> None:
    """K-quant and legacy GGUF blocks in one model (hidden 256: whole 256-value super-blocks). Random
    blocks (random 4-6 bit sub-scales and mins) make weights far wilder than trained ones, whose
    activations the int8 rounding then moves by ~20%: only native vs torch ops is checked here
    (the kernels' error bound per block format is tests/targets/test_qkernels.py's)."""
    cfg = llama_config(hidden=256, inter=512, vocab=64, heads=4, kv_heads=2, head_dim=64)
    module, weights = random_llama(cfg, seed=4)
    rng = np.random.default_rng(4)
    types = {"q": "Q4_K", "k": "Q5_K", "v": "Q6_K", "o": "Q3_K", "gate": "Q2_K", "up": "Q5_1", "down": "Q4_K"}
    for name in list(weights):
        part = name.rsplit(".", 1)[-1]
        if part in types or name == "lm_head":
            out, inp = np.asarray(weights[name]).shape
            kind = types.get(part, "Q8_0")
            weights[name] = QuantizedTensor.from_ggml(kind, (out, inp), random_blocks(FORMATS[kind], out, inp, rng))
    from llmc.compiler.frontends.llama import build_module, declare_params

    module = build_module(cfg, declare_params(cfg, weights, "test"))
    module, _ = run_pipeline(module, weights, "fuse-add-rmsnorm,fold-rope,dce")
    assert_native_matches(module, weights, cfg.vocab_size, seed=3, against_float=False)


@pytest.mark.parametrize("pipeline", PIPELINES[1:])
def test_the_default_float16_cache_stays_within_the_int8_activations_error(kernels, pipeline: str) -> None:
    """float16 keys and values (rounding error 2^-11 relative) move logits far less than the int8
    activations do; the cache takes half the bytes of float32."""
    cfg, module, weights = model(pipeline)
    native = TorchExecutor(module, weights)
    assert native.kv_dtype == torch.float16 and native.block_major
    assert native.kv_spec().bytes_per_block * 2 == TorchExecutor(module, weights, kv_cache_dtype="float32"
                                                                  ).kv_spec().bytes_per_block
    got = schedule(SequenceDriver(native, max_seqs=3), cfg.vocab_size, 1)
    assert native.k_cache.dtype == torch.float16 and torch.isfinite(native.k_cache).all()
    float_ops = schedule(SequenceDriver(TorchExecutor(module, weights, step="ops", quant_kernels="dequant"),
                                        max_seqs=3), cfg.vocab_size, 1)
    for a, b in zip(float_ops, got, strict=True):
        assert_int8_activation_close(b, a)


def test_kv_cache_dtypes_the_executor_cannot_run_are_refused(kernels) -> None:
    _, module, weights = model(PIPELINES[1])
    assert TorchExecutor(module, weights, step="ops").kv_dtype == torch.float32  # auto: the activations' dtype
    with pytest.raises(LlmcError, match=r"kv_cache_dtype=float16 is not available.*step=ops"):
        TorchExecutor(module, weights, step="ops", kv_cache_dtype="float16")
    with pytest.raises(LlmcError, match="kv_cache_dtype=bfloat16 is not available"):
        TorchExecutor(module, weights, kv_cache_dtype="bfloat16")
    with pytest.raises(LlmcError, match="kv_cache_dtype must be one of auto, float32, float16, bfloat16"):
        TorchExecutor(module, weights, kv_cache_dtype="int8")


def test_the_kv_cache_dtype_option_is_recorded_and_can_be_overridden_at_load(kernels) -> None:
    from llmc.targets.torch.target import TorchTarget

    _, module, weights = model(PIPELINES[1])
    target = TorchTarget()
    assert target.load_module(module, weights).kv_dtype == torch.float16
    assert target.load_module(module, weights, saved={"kv_cache_dtype": "float32"}).kv_dtype == torch.float32
    assert target.load_module(module, weights, saved={"kv_cache_dtype": "float32"},
                              kv_cache_dtype="float16").kv_dtype == torch.float16


def test_a_sequence_gets_the_same_bits_alone_in_a_batch_and_on_any_thread_count(kernels) -> None:
    cfg, module, weights = model(PIPELINES[1])
    rng = np.random.default_rng(7)
    prompt = [int(t) for t in rng.integers(0, cfg.vocab_size, 13)]
    others = [[int(t) for t in rng.integers(0, cfg.vocab_size, n)] for n in (30, 5)]

    def run(batched: bool, threads: int) -> list[np.ndarray]:
        driver = SequenceDriver(TorchExecutor(module, weights, threads=threads), max_seqs=3)
        chunks = {0: prompt, **({1: others[0], 2: others[1]} if batched else {})}
        out = [driver.step(chunks)[0]]
        for t in (3, 9):
            out.append(driver.step({0: [t], **({1: [t + 1], 2: [t + 2]} if batched else {})})[0])
        return out

    alone = run(False, 1)
    for batched, threads in ((True, 1), (False, 2), (True, 2)):
        for a, b in zip(alone, run(batched, threads), strict=True):
            assert np.array_equal(a, b), (batched, threads)


@pytest.mark.parametrize("threads", [2, 4])
def test_pieces_computed_twice_by_idle_threads_give_the_same_bits(kernels, threads: int) -> None:
    # Patience 0: a thread with nothing left to take computes every piece another thread holds, so pieces
    # run twice and their commits race; 4 threads on a smaller machine are also preempted inside pieces
    # and resume after their region ended. Only one copy of each piece may land, and a late one must write
    # nothing: the outputs stay those of one thread, bit for bit, step after step. (A model wide enough
    # that its linears and norms are cut into pieces; the schedule repeats until some piece did run twice,
    # which the thread timing decides, at most 30 times.)
    cfg, module, weights = model(PIPELINES[1], hidden=256, inter=512, heads=8, kv_heads=4, head_dim=32)
    alone = schedule(SequenceDriver(TorchExecutor(module, weights, threads=1), max_seqs=3), cfg.vocab_size, 11)
    _, repeated_before = qkernels.pool_counts()
    with qkernels.steal_patience(0):
        for _ in range(30):
            raced = schedule(SequenceDriver(TorchExecutor(module, weights, threads=threads), max_seqs=3),
                             cfg.vocab_size, 11)
            for a, b in zip(alone, raced, strict=True):
                assert np.array_equal(a, b)
            if qkernels.pool_counts()[1] > repeated_before + 10:
                break
    assert qkernels.pool_counts()[1] > repeated_before  # the races ran


def test_programs_stepping_at_once_from_two_threads_keep_their_bits(kernels) -> None:
    # Two executors in one process (two engines, two models) step at the same time: their programs share
    # the process's pools (2 and 3 threads here), which run one plan at a time, and neither pool is
    # replaced under the other.
    import threading

    cfg, module, weights = model(PIPELINES[1])
    alone = schedule(SequenceDriver(TorchExecutor(module, weights, threads=1), max_seqs=3), cfg.vocab_size, 13)
    results: dict[int, list[list[np.ndarray]]] = {2: [], 3: []}
    errors: list[BaseException] = []

    def drive(threads: int) -> None:
        try:
            for _ in range(4):
                driver = SequenceDriver(TorchExecutor(module, weights, threads=threads), max_seqs=3)
                results[threads].append(schedule(driver, cfg.vocab_size, 13))
        except BaseException as e:  # re-raised below
            errors.append(e)

    workers = [threading.Thread(target=drive, args=(n,)) for n in results]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    assert not errors, errors
    for runs in results.values():
        assert len(runs) == 4
        for run in runs:
            for a, b in zip(alone, run, strict=True):
                assert np.array_equal(a, b)


def test_every_kernel_path_runs_the_program(kernels) -> None:
    cfg, module, weights = model(PIPELINES[1])
    results = {}
    for isa in qkernels.isa_paths():
        with qkernels.use_isa(isa):
            results[isa] = schedule(SequenceDriver(TorchExecutor(module, weights), max_seqs=3), cfg.vocab_size, 5)
    for got in results.values():  # same matmul bits; float ops may use FMA or not
        assert_close(got, results["scalar"])


def test_prefix_blocks_copied_for_a_native_key_cache(kernels) -> None:
    cfg, module, weights = model(PIPELINES[1])
    ex = TorchExecutor(module, weights)
    driver = SequenceDriver(ex, max_seqs=2)
    ids = [int(t) for t in np.random.default_rng(1).integers(0, cfg.vocab_size, 20)]
    first = driver.step({0: ids})[0]
    ex.copy_blocks([(0, driver.blocks_per_seq), (1, driver.blocks_per_seq + 1)])  # seq 1 reuses seq 0's blocks
    driver.lengths[1] = 20
    nxt_a, nxt_b = driver.step({0: [5]})[0], driver.step({1: [5]})[0]
    np.testing.assert_array_equal(nxt_a, nxt_b)
    assert first.shape == (20, cfg.vocab_size)


def test_where_native_does_not_apply_the_executor_says_why(kernels) -> None:
    cfg, module, weights = model("fuse-qkv,dce")  # float weights
    ex = TorchExecutor(module, weights)
    assert ex.native is None and "not a quantized one" in (ex.native_reason or "")
    cfg, module, weights = model(PIPELINES[1])
    ex = TorchExecutor(module, weights, deterministic=True)
    assert ex.native is None and "deterministic" in (ex.native_reason or "")
    ex = TorchExecutor(module, weights, quant_kernels="dequant")
    assert ex.native is None
    with pytest.raises(Unsupported, match=r"float16 matrix|float32 matrix"):
        mixed_module, mixed_weights = random_llama(cfg, seed=1, quant={"layers.0.q": QuantSpec(4, 32, False)})
        lower_native(next(iter(mixed_module)), TorchExecutor(mixed_module, mixed_weights, step="ops").params, cfg)
    with pytest.raises(LlmcError, match="step must be"):
        TorchExecutor(module, weights, step="fast")


def test_bad_steps_are_refused_not_crashes(kernels) -> None:
    cfg, module, weights = model(PIPELINES[1])
    ex = TorchExecutor(module, weights)
    driver = SequenceDriver(ex, max_seqs=2)
    with pytest.raises(RequestError, match="token ids"):  # StepBatch.check, before the native call
        driver.step({0: [cfg.vocab_size + 5]})
    with pytest.raises(RuntimeError, match="token id"):  # and the native program's own check
        ex.native["prefill"].program.run(torch.tensor([cfg.vocab_size]), torch.tensor([1]), torch.tensor([1]),
                                         torch.zeros(1, 1, dtype=torch.int64), torch.tensor([0]), ex.k_cache,
                                         ex.v_cache, ex.block_size, 1)
    with pytest.raises(RequestError, match="beyond the context"):
        driver.lengths[0] = cfg.max_position
        driver.step({0: [1]})
    with pytest.raises(RuntimeError, match="block id out of range"):
        driver.table = lambda seq: [10**6]  # type: ignore[method-assign]
        driver.lengths[0] = 0
        driver.step({0: [1, 2]})
    assert torch.isfinite(ex.k_cache).all()


def test_a_steps_logits_buffer_is_reused_only_once_nobody_holds_it(kernels) -> None:
    """The native step writes into the previous step's logits buffer when the caller dropped it (no
    fresh pages each step), never into logits (or a view of them) the caller still holds."""
    cfg, module, weights = model(PIPELINES[1])
    reused, fresh = (SequenceDriver(TorchExecutor(module, weights), max_seqs=2) for _ in range(2))
    rng = np.random.default_rng(11)
    prompts = {seq: [int(t) for t in rng.integers(0, cfg.vocab_size, n)] for seq, n in ((0, 9), (1, 4))}
    reused.step(prompts, all_rows=False), fresh.step(prompts, all_rows=False)
    held = reused.step({0: [1], 1: [2]}, all_rows=False)  # kept: the next step must not overwrite it
    held_copy = [h.copy() for h in held]
    want = [fresh.step({0: [t], 1: [t + 1]}, all_rows=False) for t in (1, 3, 5, 7)]  # every result kept: all fresh
    previous = None
    for step, t in enumerate((3, 5, 7)):
        got = reused.step({0: [t], 1: [t + 1]}, all_rows=False)
        for a, b in zip(got, want[step + 1], strict=True):
            np.testing.assert_array_equal(a, b)
        # the step after the held one gets a fresh buffer; the next two reuse it (dropped in between)
        assert (got[0].base is previous()) == (step > 0) if previous else step == 0
        previous = weakref.ref(got[0].base)
        del got, a, b
    for a, b, c in zip(held, held_copy, want[0], strict=True):
        np.testing.assert_array_equal(a, b)
        np.testing.assert_array_equal(a, c)


def test_logits_larger_than_the_keep_limit_are_not_held(kernels, monkeypatch) -> None:
    from llmc.targets.torch import native

    cfg, module, weights = model(PIPELINES[1])
    ex = TorchExecutor(module, weights)
    driver = SequenceDriver(ex, max_seqs=1)
    driver.step({0: [1, 2, 3]})
    assert any(step._array is not None for step in ex.native.values())  # small: kept for the next step
    monkeypatch.setattr(native, "KEEP_LOGITS_BYTES", 3 * cfg.vocab_size * 4 - 1)
    ex = TorchExecutor(module, weights)
    driver = SequenceDriver(ex, max_seqs=1)
    first = driver.step({0: [1, 2, 3]})[0]  # 3 rows: one byte over the limit
    assert all(step._array is None for step in ex.native.values())
    np.testing.assert_array_equal(first, SequenceDriver(TorchExecutor(module, weights), max_seqs=1).step(
        {0: [1, 2, 3]})[0])


def test_linears_of_one_input_are_lowered_next_to_each_other() -> None:
    """q/k/v and gate/up of the unfused IR become neighbours (one group in the program), and the new
    order still defines every value before its use. No kernels needed: only the node order."""
    _, module, _ = model(PIPELINES[0])
    for fn in module:
        order = linears_together(list(fn.nodes))
        assert sorted(map(id, order)) == sorted(map(id, fn.nodes))
        seen: set[int] = set()
        for node in order:
            assert all(id(v.node) in seen for v in node.inputs), node.op
            seen.add(id(node))
        # between two linears of one input only param nodes (their weights), in the new order only
        def apart(nodes: list) -> int:
            last: dict[int, int] = {}
            count = 0
            for i, n in enumerate(nodes):
                if n.op != "linear":
                    continue
                j = last.get(id(n.inputs[0]))
                count += j is not None and any(m.op != "param" for m in nodes[j + 1:i])
                last[id(n.inputs[0])] = i
            return count

        assert apart(order) == 0
        assert apart(list(fn.nodes)) > 0  # the IR's gate, silu, up order
