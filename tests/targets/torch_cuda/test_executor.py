"""The CUDA executor's step functions against the torch target's CPU executor.

Here (no GPU) they run on CPU tensors with ``cuda_graphs=False`` and the Triton kernels under the
interpreter; on a GPU host the same checks run with graphs on CUDA. Ragged decode batches padded to
their buckets and eager prefill/mixed steps must give the CPU executor's logits (float32: the kernels'
IEEE float32 products differ from SDPA's only by summation order, well under 1e-4 on logits of order 1),
and the engine, its steps launched early with deferred tokens, the same tokens for greedy and seeded
requests with penalties.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from tests.targets.torch_cuda.device import DEVICE, ON_GPU, TRITON_MISSING  # conftest.py set TRITON_INTERPRET

pytest.importorskip("triton", reason=TRITON_MISSING)

from llmc.compiler.errors import LlmcError
from llmc.driver import CompileOptions, compile_model
from llmc.runtime.artifact import Artifact
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.sampling import SamplingParams
from llmc.targets.torch.cuda.executor import CudaTorchExecutor, check_device
from llmc.targets.torch.executor import TorchExecutor
from tests.helpers import RAGGED_STEPS, SequenceDriver


@pytest.fixture(scope="module", params=["float", "int4"])
def artifact(request: pytest.FixtureRequest, tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Artifact:
    quant = "none" if request.param == "float" else "int4"
    out = tmp_path_factory.mktemp(f"cuda-exec-{request.param}")
    return Artifact.load(compile_model(tiny_hf, out / "art", CompileOptions(quant=quant)))


def _cuda_executor(art: Artifact, buckets: tuple[int, ...] = (1, 2, 4)) -> CudaTorchExecutor:
    return CudaTorchExecutor(art.module, art.weights(), device=DEVICE, cuda_graphs=ON_GPU, buckets=buckets)


def _torch_executor(art: Artifact) -> TorchExecutor:
    return TorchExecutor(art.module, art.weights(), device="cpu", quant_kernels="dequant")


def test_ragged_steps_match_the_torch_executor(artifact: Artifact) -> None:
    # buckets (1, 2, 4): decode steps of 3 sequences pad to 4; prefill and mixed steps run eagerly
    ragged = [{seq: [t % 128 for t in ids] for seq, ids in chunks.items()} for chunks in RAGGED_STEPS]  # vocab 128
    steps = [*ragged, {0: [5], 3: [6], 7: [7]}, {0: [8]}, {0: [9], 3: [10], 7: [11]}]
    got, want = SequenceDriver(_cuda_executor(artifact)), SequenceDriver(_torch_executor(artifact))
    for i, chunks in enumerate(steps):
        for g, w in zip(got.step(chunks), want.step(chunks), strict=True):
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"step {i}")


def test_a_decode_batch_past_the_largest_bucket_runs_eagerly(artifact: Artifact) -> None:
    chunks = {0: [1, 5, 9], 1: [1, 7], 2: [3]}
    got, want = SequenceDriver(_cuda_executor(artifact, buckets=(1, 2))), SequenceDriver(_torch_executor(artifact))
    got.step(chunks), want.step(chunks)
    for g, w in zip(got.step({0: [4], 1: [5], 2: [6]}), want.step({0: [4], 1: [5], 2: [6]}), strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_engine_with_early_launch_gives_the_torch_executors_tokens(artifact: Artifact) -> None:
    rng = np.random.default_rng(17)
    prompts = [rng.integers(3, 128, int(n)).tolist() for n in rng.integers(2, 20, 5)]
    params = [SamplingParams(max_tokens=8, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=8, temperature=0.8, top_k=20, top_p=0.9, seed=3, ignore_eos=True),
              SamplingParams(max_tokens=6, temperature=0, repetition_penalty=1.3, frequency_penalty=0.5,
                             ignore_eos=True),
              SamplingParams(max_tokens=7, temperature=1.0, min_p=0.05, presence_penalty=0.4, seed=11,
                             ignore_eos=True),
              SamplingParams(max_tokens=5, temperature=0, logprobs=3, ignore_eos=True)]
    outs = []
    for make in (_torch_executor, _cuda_executor):
        config = EngineConfig(max_running=4, max_num_tokens=32, num_blocks=40, block_size=None)
        with Engine(make(artifact), config=config) as engine:
            executor = engine.executor
            outs.append(engine.generate(prompts, params))
            assert engine.stats()["kv_used_blocks"] == 0
    assert isinstance(executor, CudaTorchExecutor) and executor.deferred_launches > 0  # steps overlapped
    for a, b in zip(*outs, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
    want, got = outs[0][4].logprobs, outs[1][4].logprobs
    assert want is not None and got is not None
    for w, g in zip(want, got, strict=True):
        assert w.token_id == g.token_id and abs(w.logprob - g.logprob) < 1e-4
        assert [t for t, _ in w.top] == [t for t, _ in g.top]


def test_what_cannot_run_here_is_refused_with_the_reason(monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(LlmcError, match="CUDA graphs need a CUDA device"):
        check_device(torch.device("cpu"), cuda_graphs=True)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(LlmcError, match="torch sees no CUDA GPU"):
        check_device(torch.device("cuda"), cuda_graphs=True)


def test_init_cache_of_the_same_size_keeps_the_cache_and_buffers(artifact: Artifact) -> None:
    ex = _cuda_executor(artifact)
    ex.init_cache(8)
    assert ex.scratch_block == 8 and ex.k_cache is not None and ex.k_cache.shape[1] == 9 * ex.block_size
    cache = ex.k_cache
    buffers = ex.graphs.buffers_for(2)
    ex.init_cache(8)  # a benchmark's next run: nothing is reallocated or recaptured
    assert ex.k_cache is cache and ex.graphs.buffers_for(2) is buffers
    ex.init_cache(12)
    assert ex.k_cache is not cache and ex.scratch_block == 12 and ex.graphs.buffers_for(2) is not buffers
