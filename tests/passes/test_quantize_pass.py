"""The quantize pass: precision plan, overrides, param retyping, AWQ scale folding."""

from __future__ import annotations

import numpy as np
import pytest

from llmc.compiler.ir.verify import verify_module
from llmc.compiler.weights import QuantizedTensor, WeightStore, as_float
from llmc.errors import LlmcError
from llmc.passes.awq import apply_awq, find_groups
from llmc.passes.quant_plan import QuantPlan, parse_scheme
from llmc.passes.quant_rtn import fake_quantize
from llmc.passes.quantize import QuantizePass
from tests.passes.util import interpret_steps, llama_config, random_llama, run_pipeline


def test_plan_defaults_and_overrides() -> None:
    plan = QuantPlan.build("int4", group=64, overrides=["layers.0.*=int8", "layers.0.q=fp16", "lm_head=none"])
    assert plan.scheme_for("layers.1.q").describe() == "int4g64a"
    assert plan.scheme_for("embed").describe() == "int8gchs"  # int4 keeps the head at int8
    assert plan.scheme_for("lm_head").describe() == "float32"
    assert plan.scheme_for("layers.0.k").describe() == "int8gchs"
    assert plan.scheme_for("layers.0.q").describe() == "float16"  # the last matching override wins
    assert QuantPlan.build("int8").scheme_for("embed").describe() == "int8gchs"
    assert QuantPlan.build("int4", symmetric=True).scheme_for("layers.0.up").describe() == "int4g32s"
    assert parse_scheme("int4g128s").describe() == "int4g128s"


@pytest.mark.parametrize("bad", ["int3", "fp8", "layers.0.*"])
def test_bad_schemes_and_overrides_are_clear_errors(bad: str) -> None:
    with pytest.raises(LlmcError):
        QuantPlan.build("int4", overrides=[bad])


def test_pass_quantizes_matrices_only_and_keeps_ops() -> None:
    module, weights = random_llama(llama_config())
    out, records = run_pipeline(module, weights, "quantize(int4,group=16,override=layers.1.*=int8)")
    verify_module(out)
    assert out.op_counts() == module.op_counts()
    for name, info in out.params.items():
        w = weights[name]
        if info.type.rank == 1:
            assert info.quant is None and isinstance(w, np.ndarray)
            continue
        assert isinstance(w, QuantizedTensor) and info.quant == w.spec
        want = "int8" if name.startswith("layers.1.") or name in ("embed", "lm_head") else "int4g16a"
        assert w.spec.describe().startswith(want)
    assert records[-1].stats["bytes_after"] < records[-1].stats["bytes_before"] / 3


@pytest.mark.parametrize(("scheme", "dtype"), [("fp16", "float16"), ("bf16", "bfloat16")])
def test_float_casts_retype_param_nodes(scheme: str, dtype: str) -> None:
    module, weights = random_llama(llama_config())
    before = interpret_steps(module, weights)
    out, _ = run_pipeline(module, weights, f"quantize({scheme})")
    verify_module(out)  # param nodes carry the new dtype
    assert out.params["layers.0.q"].type.dtype == dtype
    assert out.params["layers.0.attn_norm"].type.dtype == "float32"
    after = interpret_steps(out, weights)
    tol = 2e-2 if scheme == "bf16" else 2e-3
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b, a, atol=tol * np.abs(a).max())


def test_pass_after_fusions_quantizes_the_fused_weights() -> None:
    module, weights = random_llama(llama_config())
    out, _ = run_pipeline(module, weights, "fuse-qkv,fuse-gate-up,dce,quantize(int4,group=16)")
    fused = [n for n in out.referenced_params() if n.endswith(("qkv", "gate_up"))]
    assert fused and all(isinstance(weights[n], QuantizedTensor) for n in fused)


def _calib(vocab: int, n: int = 48) -> list[int]:
    return [int(i) for i in np.random.default_rng(3).integers(0, vocab, size=n)]


@pytest.mark.parametrize("pipeline", ["", "fuse-qkv,fuse-gate-up,fuse-add-rmsnorm,dce"])
def test_awq_scaling_is_exact_in_float_and_shared_by_groups(pipeline: str) -> None:
    config = llama_config()
    module, weights = random_llama(config)
    if pipeline:
        module, _ = run_pipeline(module, weights, pipeline)
    groups = find_groups(module.functions["prefill"])
    assert len(groups) == 3 * config.num_layers  # qkv (one norm), gate/up (one norm), down (via up)
    if not pipeline:
        assert ["layers.0.q", "layers.0.k", "layers.0.v"] in [g.linears for g in groups]
        assert ["layers.0.gate", "layers.0.up"] in [g.linears for g in groups]
    before = interpret_steps(module, weights)
    orig = {n: as_float(weights[n]).copy() for n in module.referenced_params()}
    fake = lambda name, w: fake_quantize(w, parse_scheme("int4", 16).spec_for(w.shape[1]))
    stats = apply_awq(module, weights, _calib(config.vocab_size), fake, lambda n: True, grid=10)
    assert stats["awq_err_permille_of_rtn"] <= 1000  # never worse than plain RTN on the calibration data
    assert stats["awq_scaled"] > 0
    changed = [n for n in orig if not np.array_equal(orig[n], as_float(weights[n]))]
    assert any("norm" in n for n in changed)  # inverse scales folded into the norms
    after = interpret_steps(module, weights)
    for a, b in zip(before, after, strict=True):
        np.testing.assert_allclose(b, a, rtol=0, atol=1e-4 * np.abs(a).max())


def test_calibrated_int4_is_closer_to_float_than_rtn_on_calibration_tokens() -> None:
    config = llama_config()
    ids = _calib(config.vocab_size, 40)

    def error(calibrated: bool) -> float:
        module, weights = random_llama(config, seed=5)
        ref = interpret_steps(module, weights)
        qp = QuantizePass("int4", group=16, calib_ids=ids if calibrated else None)
        out, _ = run_pipeline(module, weights, "dce")
        from llmc.passes.base import PassContext

        result = qp.run(out, PassContext(weights=weights, target_ops=frozenset()))
        got = interpret_steps(result.module, weights)
        return float(sum(np.abs(a - b).mean() for a, b in zip(ref, got, strict=True)))

    assert error(True) < error(False) * 1.05


def test_pass_string_reads_a_json_calibration_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "ids.json"
    path.write_text("[1, 5, 7, 9, 11, 3]")
    assert QuantizePass("int4", calib=str(path)).calib_ids == [1, 5, 7, 9, 11, 3]
    path.write_text("not json")
    with pytest.raises(LlmcError, match="JSON"):
        QuantizePass("int4", calib=str(path))


def test_weight_store_gets_quantized_tensors_in_place() -> None:
    module, weights = random_llama(llama_config())
    assert isinstance(weights, WeightStore)
    run_pipeline(module, weights, "quantize(int8)")
    assert all(isinstance(weights[n], QuantizedTensor) for n in module.params if module.params[n].type.rank == 2)
