"""The tvm target on the CPU (llvm): exact greedy ids, parity with torch, the paged cache."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

# One TVM worker thread: TVM's spinning thread pool degrades badly on a loaded 2-core CI machine.
os.environ.setdefault("TVM_NUM_THREADS", "1")
pytest.importorskip("tvm", reason="apache-tvm is not installed (the tvm extra: pip install -e '.[tvm]')")

from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import WeightStore
from llmc.driver import CompileOptions, compile_model
from llmc.errors import RequestError
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.generate import generate_ids
from llmc.runtime.loader import load_model
from llmc.runtime.registry import get_target
from llmc.runtime.sampling import SamplingParams
from llmc.targets.tvm.rope import interleaved_to_half
from tests.helpers import RAGGED_STEPS, SequenceDriver, interpret
from tests.targets.tvm_util import LLAMA3, quantize, random_weights, tiny_config, tiny_module, write_artifact

pytestmark = pytest.mark.tvm


@pytest.fixture(scope="module")
def stories_tvm(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_model(stories_hf, tmp_path_factory.mktemp("tvm") / "stories", CompileOptions(target="tvm"))


def _greedy(path: Path, n: int = 200) -> list[int]:
    model = load_model(str(path))
    return generate_ids(model, [1], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)).token_ids


def test_stories_greedy_200_exact(stories_tvm: Path, stories_expected_ids: list[int]) -> None:
    assert _greedy(stories_tvm) == stories_expected_ids
    manifest = Artifact.load(stories_tvm).manifest
    assert manifest["target"]["options"]["device"] == "cpu"
    assert (stories_tvm / "target" / "tvm" / "model.so").stat().st_size > 0


def test_stories_gguf_interleaved_rope_greedy_exact(stories_gguf: Path, stories_expected_ids: list[int],
                                                    tmp_path: Path) -> None:
    """GGUF stores q/k for interleaved (GGML) RoPE: TVM's gptj rope mode."""
    art = compile_model(stories_gguf, tmp_path / "gguf", CompileOptions(target="tvm"))
    payload = Artifact.load(art).manifest["target"]["notes"]
    assert any("interleaved via TVM gptj" in n for n in payload)
    assert _greedy(art) == stories_expected_ids


def test_logits_match_torch_on_ragged_batches(stories_tvm: Path, stories_artifact: Path) -> None:
    tvm_exec = get_target("tvm").load(Artifact.load(stories_tvm))
    torch_exec = get_target("torch").load(Artifact.load(stories_artifact))
    tvm_drv, torch_drv = SequenceDriver(tvm_exec), SequenceDriver(torch_exec)
    for i, chunks in enumerate(RAGGED_STEPS):
        all_rows = i != 2
        got, want = tvm_drv.step(chunks, all_rows=all_rows), torch_drv.step(chunks, all_rows=all_rows)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float32
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"step {i}")


def test_block_tables_place_the_cache(stories_tvm: Path) -> None:
    """The runtime's block tables say where every token lives: any blocks, a rolled-back or restarted
    sequence, a prefix shared by two sequences' tables; bad ids and block ids are refused."""
    ex = get_target("tvm").load(Artifact.load(stories_tvm))
    ex.init_cache(8)
    prompt = [1, 403, 407, 261]

    def run(ids: list[int], past: int, table: list[int], seq: int = 0) -> np.ndarray:
        n = len(ids)
        batch = StepBatch(np.asarray(ids), BatchLayout((seq,), (n,), (past + n,)), [table], [n - 1])
        return ex.step(batch)[0]

    first = run(prompt, 0, [3])
    step = run([378], 4, [3])
    np.testing.assert_allclose(run([378], 4, [3]), step, atol=1e-6)  # rolled back to 4 cached tokens
    np.testing.assert_allclose(run(prompt, 0, [3]), first, atol=1e-6)  # restarted
    np.testing.assert_allclose(run(prompt, 0, [6]), first, atol=1e-6)  # another block
    # 20 tokens over two blocks, then a second sequence sharing the full first block
    long = [1, *range(300, 319)]
    run(long, 0, [2, 5])
    alone = run([377], 20, [2, 5])
    run(long[16:], 16, [2, 7], seq=1)  # its own second block, the first one shared
    np.testing.assert_allclose(run([377], 20, [2, 7], seq=1), alone, atol=1e-5)
    with pytest.raises(RequestError, match="token ids"):
        run([100000], 5, [3])
    with pytest.raises(RequestError, match="block ids"):
        run([378], 4, [8])
    with pytest.raises(RequestError, match="cache blocks for"):
        run(long, 0, [2])


def _compare_with_interpreter(module, weights: WeightStore, art: Artifact, atol: float) -> None:
    steps = [{0: [1, 5, 9, 33, 7], 1: [2, 60]}, {0: [11], 1: [42, 43, 44]}, {1: [3]}]
    want = interpret(module, weights, steps)
    driver = SequenceDriver(get_target("tvm").load(art))
    for i, chunks in enumerate(steps):
        for g, w in zip(driver.step(chunks), want[i], strict=True):
            np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"step {i}")


def test_interleaved_rope_with_llama3_scaling_permutes_qk(tmp_path: Path) -> None:
    """TVM has no interleaved llama3 rope: q/k rotary dims are permuted to rotate-half instead."""
    config = tiny_config(rope_style="interleaved", rope_scaling=LLAMA3, rope_theta=500000.0)
    weights = random_weights(config, seed=3)
    module = tiny_module(config, weights)
    art = write_artifact(module, weights, tmp_path / "art")
    rope = json.loads(art.file("target/tvm/tvm.json").read_text())["rope"]
    assert rope["permute_qk"] and rope["rope_scaling"]["rope_type"] == "llama3"
    _compare_with_interpreter(module, weights, art, atol=1e-4)


def test_partial_rotary_dim_half_rope(tmp_path: Path) -> None:
    config = tiny_config(rotary_dim=4, head_dim=8)
    weights = random_weights(config, seed=4)
    module = tiny_module(config, weights)
    _compare_with_interpreter(module, weights, write_artifact(module, weights, tmp_path / "art"), atol=1e-4)


def test_int4_int8_dequantization_fused_into_matmul(tmp_path: Path) -> None:
    config = tiny_config()
    weights = random_weights(config, seed=5)
    specs = {"q": QuantSpec(4, 16, False), "k": QuantSpec(4, 8, True), "v": QuantSpec(8, 32, True),
             "o": QuantSpec(8, 16, False), "gate": QuantSpec(4, 32, False), "up": QuantSpec(4, 16, True),
             "down": QuantSpec(4, 16, False)}
    for name in list(weights):
        kind = name.rsplit(".", 1)[-1]
        if kind in specs:
            weights[name] = quantize(np.asarray(weights[name]), specs[kind])
    weights["lm_head"] = quantize(np.asarray(weights["lm_head"]), QuantSpec(8, 32, True))
    weights["embed"] = quantize(np.asarray(weights["embed"]), QuantSpec(4, 32, False, "float32"))
    module = tiny_module(config, weights)
    art = write_artifact(module, weights, tmp_path / "art")
    library = (art.path / "target" / "tvm" / "model.so").read_bytes()
    assert b"dequantize_matmul" in library  # one PrimFunc holds both stages
    _compare_with_interpreter(module, weights, art, atol=1e-4)


def test_interleaved_to_half_permutation() -> None:
    perm = interleaved_to_half(8, 6)
    assert perm.tolist() == [0, 2, 4, 1, 3, 5, 6, 7]


def test_cli_errors_are_one_line(stories_hf: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llmc.cli import main

    result = CliRunner().invoke(main, ["compile", str(stories_hf), "--target", "tvm", "--device", "cuda",
                                       "-o", str(tmp_path / "x")])
    assert result.exit_code == 2
    assert "needs --arch" in result.output and len(result.output.strip().splitlines()) == 1
    result = CliRunner().invoke(main, ["compile", str(stories_hf), "--target", "tvm", "--device", "tpu",
                                       "-o", str(tmp_path / "y")])
    assert result.exit_code == 2 and "cpu, cuda, rocm" in result.output


def test_engine_batches_over_tvm_with_prefix_caching(stories_tvm: Path) -> None:
    from llmc.runtime.engine import Engine

    prompts = [[1, 403, 407], [1, 261], [1, 378, 1, 70, 9], [1]]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    alone = [generate_ids(load_model(str(stories_tvm)), p, params).token_ids for p in prompts]
    engine = Engine.load(str(stories_tvm), max_running=4)
    with engine:
        outs = engine.generate(prompts, params)
        shared = [[1, *range(300, 340)], [1, *range(300, 340), 7]]  # a 32-token prefix in two full blocks
        engine.generate(shared[:1], params)
        again = engine.generate(shared[1:], params)
        assert engine.stats()["prefix_cache_hits"] > 0  # the tvm cache reads the runtime's block tables
    assert [o.token_ids for o in outs] == alone
    assert again[0].token_ids == generate_ids(load_model(str(stories_tvm)), shared[1], params).token_ids


# ragged prefills of five sequences, then decode steps of 1..5 sequences (3 pads to bucket 4, 5 is above
# the largest bucket: the symbolic decode), with a prefill chunk mixed in between
BUCKET_STEPS: list[dict[int, list[int]]] = [
    {0: [1, 403, 407, 261, 378], 1: [1, 17], 2: [1, 300, 301], 3: [1], 4: list(range(310, 330))},
    {2: [302]},
    {0: [383], 4: [97]},
    {0: [98], 1: [90], 3: [91]},
    {0: [99], 1: [92], 2: [93], 3: [94]},
    {0: [7], 1: [8], 2: [9], 3: [10], 4: [11]},
    {1: [40, 41, 42], 3: [12]},
    {4: [13], 1: [14], 0: [15]},
]


def test_decode_buckets_pad_batches_to_the_same_logits(stories_hf: Path, stories_tvm: Path, tmp_path: Path) -> None:
    """A build with decode buckets 1,2,4 runs each decode batch in the smallest bucket that holds it (rows
    past the batch padded: no cache writes, no reads) and gives the logits of the bucket-1-only build."""
    art = compile_model(stories_hf, tmp_path / "b124",
                        CompileOptions(target="tvm", target_options={"decode_buckets": "4,2"}))
    manifest = Artifact.load(art).manifest["target"]
    assert manifest["options"]["decode_buckets"] == "1,2,4"
    assert "static decode buckets: 1, 2, 4" in manifest["notes"]
    bucketed = get_target("tvm").load(Artifact.load(art))
    plain = get_target("tvm").load(Artifact.load(stories_tvm))
    assert [bucketed.decode_bucket(n) for n in (1, 2, 3, 4, 5)] == [1, 2, 4, 4, None]
    assert [plain.decode_bucket(n) for n in (1, 2)] == [1, None]
    drivers = SequenceDriver(bucketed), SequenceDriver(plain)
    calls: list[str] = []

    class Recording:  # the VM, recording which function each step runs
        def __init__(self, vm: object) -> None:
            self.vm = vm

        def __getitem__(self, name: str) -> object:
            calls.append(name)
            return self.vm[name]

    bucketed.vm = Recording(bucketed.vm)
    for i, chunks in enumerate(BUCKET_STEPS):
        got, want = (d.step(chunks, all_rows=False) for d in drivers)
        for g, w in zip(got, want, strict=True):
            # float32 both ways, but the static bucket kernels (GEMV schedule) sum in another order than the
            # token-tiled symbolic ones: ~1e-5 on logits of magnitude ~15, the tolerance of the torch comparison
            np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"step {i}")
            assert g.argmax(-1).tolist() == w.argmax(-1).tolist()
    assert calls == ["prefill", "decode_b1", "decode_b2", "decode_b4", "decode_b4", "decode", "prefill", "decode_b4"]
    assert sorted(bucketed._buckets) == [1, 2, 4]
    # bucket_call (benchmarks): the step's bucket run on the device, the same result each replay
    lengths = drivers[0].lengths
    seqs = (0, 2, 3)
    batch = StepBatch(np.asarray([5, 6, 7]), BatchLayout(seqs, (1, 1, 1), tuple(lengths[s] + 1 for s in seqs)),
                      [drivers[0].table(s) for s in seqs], [0, 1, 2])
    run = bucketed.bucket_call(batch)
    assert run is not None and calls[-1] == "decode_b4"
    first = run().numpy()
    assert first.shape[0] == 4
    np.testing.assert_array_equal(run().numpy(), first)
    np.testing.assert_allclose(first[:3], plain.step(batch), atol=1e-4, rtol=0)
    prefill = StepBatch(np.asarray([5, 6]), BatchLayout((0,), (2,), (lengths[0] + 2,)), [drivers[0].table(0)], [1])
    assert bucketed.bucket_call(prefill) is None


def test_decode_buckets_keep_greedy_tokens_in_the_engine(stories_hf: Path, stories_tvm: Path, tmp_path: Path) -> None:
    from llmc.runtime.engine import Engine

    art = compile_model(stories_hf, tmp_path / "b124",
                        CompileOptions(target="tvm", target_options={"decode_buckets": "1,2,4"}))
    prompts = [[1, 403, 407], [1, 261], [1, 378, 1, 70, 9], [1], [1, 300]]  # 5, 4, 3, 2, 1 running as they finish
    params = [SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True) for n in (14, 11, 8, 5, 3)]
    outs = {}
    for path in (art, stories_tvm):
        with Engine.load(str(path), max_running=5) as engine:
            outs[path] = [o.token_ids for o in engine.generate(prompts, params)]
    alone = [generate_ids(load_model(str(stories_tvm)), p, q).token_ids for p, q in zip(prompts, params, strict=True)]
    assert outs[art] == outs[stories_tvm] == alone
