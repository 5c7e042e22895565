"""The TensorRT target's ONNX graph, checked without TensorRT: onnx.checker, standard op domains
only, and ONNX Runtime's CPU EP running it (the ``cpu-ort`` path) against the torch target."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'llmc-toolchain[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'llmc-toolchain[onnx]')")

import onnx
from click.testing import CliRunner

from llmc.cli import main
from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.weights import QuantizedTensor
from llmc.driver import CompileOptions, compile_model
from llmc.errors import LlmcError, RequestError, TargetUnavailableError
from llmc.runtime.artifact import WEIGHTS_FILE, Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.generate import generate_ids
from llmc.runtime.loader import load_model
from llmc.runtime.sampling import SamplingParams
from llmc.targets.tensorrt.engine import Profile, profile_shapes
from llmc.targets.tensorrt.lower import TENSORRT_OPS
from llmc.targets.tensorrt.quant import codes_from_transposed, transposed_codes
from tests.models import write_random_hf_model
from tests.targets.onnx_util import (
    FLOAT_ACTIVATIONS,
    SCHEDULE,
    compile_transformed,
    drive,
    load_executor,
    quantize_source,
    rtn_quantize,
)

pytestmark = pytest.mark.onnx


def _graph(path: Path) -> onnx.ModelProto:
    return onnx.load(str(path / "target" / "model.onnx"), load_external_data=False)


def assert_tensorrt_ready(path: Path) -> onnx.ModelProto:
    """onnx.checker (full), opset >= 21 in the default domain only, no contrib-op domain anywhere."""
    onnx.checker.check_model(str(path / "target" / "model.onnx"), full_check=True)
    model = _graph(path)
    assert [(o.domain, o.version >= 21) for o in model.opset_import] == [("", True)]
    domains = {n.domain for n in model.graph.node}
    assert domains <= {"", "ai.onnx"}, domains
    assert {n.op_type for n in model.graph.node} <= TENSORRT_OPS
    return model


@pytest.fixture(scope="module")
def stories_trt(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_model(stories_hf, tmp_path_factory.mktemp("trt") / "stories", CompileOptions(target="tensorrt"))


def test_graph_is_tensorrt_ready_and_interface(stories_trt: Path) -> None:
    model = assert_tensorrt_ready(stories_trt)
    artifact = Artifact.load(stories_trt)
    config = artifact.config
    inputs = {i.name for i in model.graph.input}
    # the optimization profile in the manifest names every graph input, with matching ranks
    shapes = profile_shapes(Profile.from_dict(artifact.target_options["profile"]), config)
    assert set(shapes) == inputs
    for value in model.graph.input:
        rank = len(value.type.tensor_type.shape.dim)
        assert all(len(s) == rank for s in shapes[value.name]), value.name
    outputs = [o.name for o in model.graph.output]
    assert outputs[0] == "logits"
    assert sorted(outputs[1:]) == sorted(f"present.{i}.{k}" for i in range(config.num_layers)
                                         for k in ("key", "value"))
    assert not (stories_trt / WEIGHTS_FILE).exists(), "weights live only in the ONNX payload"
    engine = artifact.target_options["engine"]
    assert engine["built"] is False and "tensorrt" in engine["reason"]
    assert any("no TensorRT engine was built" in n for n in artifact.manifest["target"]["notes"])


def test_stories_greedy_200_exact_via_onnxruntime(stories_trt: Path, stories_expected_ids: list[int]) -> None:
    model = load_model(str(stories_trt), device="cpu-ort")
    result = generate_ids(model, [1], SamplingParams(max_tokens=200, temperature=0.0))
    assert result.token_ids == stories_expected_ids


def test_weights_read_back_bit_identical(stories_trt: Path, stories_artifact: Path) -> None:
    stored = Artifact.load(stories_trt).weights()
    reference = Artifact.load(stories_artifact).weights()
    # torch's O2 leaves gate/up unfused (it does not pay off there); tensorrt fuses them
    for name in stored:
        np.testing.assert_array_equal(stored[name], _reference_weight(reference, name), err_msg=name)
    assert set(reference) - set(stored) <= {n for n in reference if n.endswith((".gate", ".up"))}


@pytest.fixture(scope="module")
def wide_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_random_hf_model(tmp_path_factory.mktemp("wide_hf"), seed=3, hidden_size=128)


@pytest.mark.parametrize(("model", "opt_level", "config", "attention"), [
    ("stories", 2, {}, "matmul"),
    ("stories", 2, {}, "onnx"),  # the opset-23 Attention op
    ("tiny", 2, {}, "matmul"),
    ("tiny", 2, {"rope_style": "interleaved"}, "matmul"),
    ("wide", 2, {"rope_style": "interleaved", "rotary_dim": 16}, "onnx"),  # partial rotary
    ("tiny", 0, {}, "matmul"),  # unfused IR: rope, attention, rms_norm, add, silu, mul
])
def test_logits_match_torch_ragged_batches(model: str, opt_level: int, config: dict, attention: str, stories_hf: Path,
                                           tiny_hf: Path, wide_hf: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    folder = {"stories": stories_hf, "tiny": tiny_hf, "wide": wide_hf}[model]
    monkeypatch.setattr("llmc.targets.tensorrt.executor.INITIAL_CAPACITY", 4)  # slots grow while running

    def transform(source) -> None:
        source.config = dataclasses.replace(source.config, **config)

    arts = {t: compile_transformed(monkeypatch, folder, tmp_path / t, t, transform, opt_level=opt_level,
                                   target_options={"attention": attention} if t == "tensorrt" else {})
            for t in ("torch", "tensorrt")}
    ops = {n.op_type for n in assert_tensorrt_ready(arts["tensorrt"]).graph.node}
    assert ("Attention" in ops) == (attention == "onnx") and ("Softmax" in ops) == (attention == "matmul")
    got = drive(load_executor(arts["tensorrt"], device="cpu-ort"), SCHEDULE)
    want = drive(load_executor(arts["torch"]), SCHEDULE)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0, err_msg=f"step {i}")


QUANT_CASES = {  # bits, group (None: one group per row), symmetric
    "int4_g32_sym": (4, 32, True),
    "int4_g32_asym": (4, 32, False),
    "int8_g32_sym": (8, 32, True),
    "int8_g32_asym": (8, 32, False),
    "int8_channel_sym": (8, None, True),
    "int8_channel_asym": (8, None, False),
}


def _reference_weight(reference, name: str):
    """``reference[name]``; torch leaves gate/up unfused, so rebuild a fused ``gate_up`` from them."""
    if name in reference or not name.endswith(".gate_up"):
        return reference[name]
    prefix = name.removesuffix("gate_up")
    gate, up = reference[prefix + "gate"], reference[prefix + "up"]
    if not isinstance(gate, QuantizedTensor):
        return np.concatenate([gate, up])
    offsets = None if gate.offsets is None else np.concatenate([gate.offsets, up.offsets])
    return QuantizedTensor(gate.spec, (gate.shape[0] + up.shape[0], gate.shape[1]),
                           np.concatenate([gate.qdata, up.qdata]), np.concatenate([gate.scales, up.scales]), offsets)


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_quantized_matches_torch(case: str, stories_hf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bits, group, symmetric = QUANT_CASES[case]
    arts = {t: compile_transformed(monkeypatch, stories_hf, tmp_path / t, t,
                                   lambda s: quantize_source(s, bits, group, symmetric))
            for t in ("torch", "tensorrt")}
    model = assert_tensorrt_ready(arts["tensorrt"])
    dq = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert dq, "quantized weights must stay quantized in the graph"
    inits = {i.name: i for i in model.graph.initializer}
    code_types = {inits[n.input[0]].data_type for n in dq if n.input[0] in inits}
    assert code_types == {onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8}
    assert all(len(n.input) == 2 for n in dq), "TensorRT needs DequantizeLinear without zero points"
    if bits == 4:
        assert {a.name: a.i for a in dq[0].attribute}.get("block_size") == 32
    # same weights in, float32 arithmetic: near-identical logits
    got = drive(load_executor(arts["tensorrt"], device="cpu-ort"), SCHEDULE)
    want = drive(load_executor(arts["torch"], **FLOAT_ACTIVATIONS), SCHEDULE)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=0, err_msg=f"{case} step {i}")
    stored, reference = Artifact.load(arts["tensorrt"]).weights(), Artifact.load(arts["torch"]).weights()
    for name in stored:
        w, ref = stored[name], _reference_weight(reference, name)
        if isinstance(ref, QuantizedTensor):
            assert isinstance(w, QuantizedTensor) and w.spec == ref.spec
            np.testing.assert_array_equal(w.qdata, ref.qdata)
            np.testing.assert_array_equal(w.scales, ref.scales)
            if ref.offsets is not None:
                np.testing.assert_array_equal(w.offsets, ref.offsets)


def test_dequantize_linear_weights_are_llmc_weights_exactly(tmp_path: Path) -> None:
    """The DQ subgraph gives exactly QuantizedTensor.dequantize() (odd out dim, ragged last group)."""
    import onnxruntime as ort

    from llmc.targets.onnx.external import ExternalData
    from llmc.targets.onnx.graph import GraphBuilder
    from llmc.targets.tensorrt.quant import DqWeight

    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.3, (7, 44)).astype(np.float32)
    for bits, group, sym in [(4, 16, True), (4, 16, False), (8, 16, True), (8, 16, False), (8, 44, False)]:
        qt = rtn_quantize(w, bits, group, sym)
        np.testing.assert_array_equal(codes_from_transposed(transposed_codes(qt), qt.shape, bits), qt.qdata)
        data = ExternalData(tmp_path / f"w{bits}{group}{sym}.onnx.data")
        g = GraphBuilder(data)
        g.node("Identity", [DqWeight(g, "w", qt).value()], outputs=["w"])
        g.add_output("w", np.float32, [44, 7])
        data.close()
        model = g.model("dq", "")
        del model.opset_import[1:]
        path = tmp_path / f"w{bits}{group}{sym}.onnx"
        path.write_bytes(model.SerializeToString())
        onnx.checker.check_model(str(path), full_check=True)
        got = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {})[0]
        np.testing.assert_array_equal(got, qt.dequantize().T, err_msg=f"{bits} {group} {sym}")


def test_quant_flag_of_the_driver(stories_hf: Path, tmp_path: Path) -> None:
    """``--quant int4`` (the quantization passes) compiles for tensorrt and matches the torch target."""
    arts = {t: compile_model(stories_hf, tmp_path / t, CompileOptions(target=t, quant="int4"))
            for t in ("torch", "tensorrt")}
    assert_tensorrt_ready(arts["tensorrt"])
    got = drive(load_executor(arts["tensorrt"], device="cpu-ort"), SCHEDULE[:2])
    want = drive(load_executor(arts["torch"], **FLOAT_ACTIVATIONS), SCHEDULE[:2])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=2e-4, rtol=0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_weights(dtype: str, tiny_hf: Path, tmp_path: Path) -> None:
    arts = {t: compile_model(tiny_hf, tmp_path / t, CompileOptions(target=t, dtype=dtype))
            for t in ("torch", "tensorrt")}
    model = assert_tensorrt_ready(arts["tensorrt"])
    want_type = onnx.TensorProto.FLOAT16 if dtype == "float16" else onnx.TensorProto.BFLOAT16
    assert sum(i.data_type == want_type for i in model.graph.initializer) >= 7  # the matrices stay half
    got = drive(load_executor(arts["tensorrt"], device="cpu-ort"), SCHEDULE[:3])
    want = drive(load_executor(arts["torch"]), SCHEDULE[:3])
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=0)


def test_loading_without_tensorrt_is_refused_clearly(stories_trt: Path) -> None:
    with pytest.raises(TargetUnavailableError, match=r"no TensorRT engine.*cpu-ort"):
        load_model(str(stories_trt))
    with pytest.raises(TargetUnavailableError, match="cpu-ort"):
        load_model(str(stories_trt), device="cpu")
    with pytest.raises(LlmcError, match="backend"):
        load_model(str(stories_trt), backend="vulkan")
    executor = load_model(str(stories_trt), backend="onnxruntime", kv_capacity=8).executor
    assert executor.kv_spec().layout == "slots"
    executor.init_cache(1)
    with pytest.raises(RequestError, match="kv_capacity"):
        executor.step(StepBatch(np.arange(1, 10), BatchLayout((0,), (9,), (9,)), [[0]], np.asarray([8])))


def test_profile_limits(stories_hf: Path, tmp_path: Path) -> None:
    with pytest.raises(LlmcError, match="attention must be one of"):
        compile_model(stories_hf, tmp_path / "bad", CompileOptions(target="tensorrt",
                                                                   target_options={"attention": "flash"}))
    with pytest.raises(LlmcError, match="profile batch"):
        compile_model(stories_hf, tmp_path / "bad", CompileOptions(target="tensorrt",
                                                                   target_options={"max_batch": 0}))
    path = compile_model(stories_hf, tmp_path / "small", CompileOptions(
        target="tensorrt", target_options={"max_batch": 2, "max_sequence": 4, "max_past": 16}))
    assert Artifact.load(path).target_options["profile"] == {"batch": [1, 2, 2], "sequence": [1, 1, 4],
                                                             "past": [1, 8, 16]}
    executor = load_executor(path, device="cpu-ort")
    executor.init_cache(3)
    with pytest.raises(RequestError, match="max_sequence"):
        executor.step(StepBatch(np.arange(1, 6), BatchLayout((0,), (5,), (5,)), [[0]], np.asarray([4])))
    # three decode rows with a batch limit of 2 run as two calls, same logits as the torch target
    steps = [[(0, [1, 2, 3])], [(1, [1, 4])], [(2, [1])], [(0, [5]), (1, [6]), (2, [7])]]
    got = drive(executor, steps)
    want = drive(load_executor(compile_model(stories_hf, tmp_path / "torch", CompileOptions())), steps)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-4, rtol=0)


def test_cli_compile_says_no_engine_and_runs_cpu_ort(stories_hf: Path, stories_expected_ids: list[int],
                                                     tmp_path: Path) -> None:
    runner = CliRunner()
    out = tmp_path / "art"
    result = runner.invoke(main, ["compile", str(stories_hf), "-o", str(out), "--target", "tensorrt"])
    assert result.exit_code == 0, result.output
    assert "no TensorRT engine was built" in result.output
    result = runner.invoke(main, ["run", str(out), "--prompt-ids", "1", "--max-tokens", "20", "--temperature", "0",
                                  "--json", "--device", "cpu-ort"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["token_ids"] == stories_expected_ids[:20]
    result = runner.invoke(main, ["run", str(out), "--prompt-ids", "1", "--max-tokens", "2"])
    assert result.exit_code == 2 and "cpu-ort" in result.output


def test_engine_continuous_batching_matches_torch(stories_trt: Path, stories_artifact: Path) -> None:
    """The continuous-batching engine over the slot cache: chunked prefills, admissions as slots free up."""
    from llmc.runtime.engine import Engine

    rng = np.random.default_rng(0)
    prompts = [[1, *rng.integers(3, 500, n).tolist()] for n in (1, 5, 17, 3, 40, 9, 2, 23)]
    params = [SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)] * len(prompts)
    outputs = {}
    for name, path, device in (("tensorrt", stories_trt, "cpu-ort"), ("torch", stories_artifact, None)):
        with Engine.load(str(path), device=device, max_running=5, max_num_tokens=32) as engine:
            outputs[name] = [r.token_ids for r in engine.generate(prompts, params)]
    assert outputs["tensorrt"] == outputs["torch"]
