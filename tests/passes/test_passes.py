"""Each pass on a small Llama graph: the IR before/after, the match count, and numerics
equal through the reference interpreter."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from llmc.compiler.ir.builder import Builder
from llmc.compiler.ir.graph import Module, ParamInfo
from llmc.compiler.ir.ops import FUSED_OPS
from llmc.compiler.ir.printer import print_function
from llmc.compiler.ir.types import KV_CACHE_TYPE, QuantSpec, TensorType
from llmc.compiler.weights import QuantizedTensor
from llmc.passes.base import PassContext
from llmc.passes.concat import concat_rows, fused_name
from llmc.passes.pipelines import parse_pipeline
from tests.passes.util import (
    assert_same_numerics,
    interpret_steps,
    llama_config,
    random_llama,
    run_pipeline,
    stat,
)

LAYERS = 2


def _counts(module: Module, fn: str = "decode") -> dict[str, int]:
    return module.functions[fn].op_counts()


@pytest.fixture(scope="module")
def llama() -> tuple[Module, object]:
    return random_llama(llama_config(layers=LAYERS, tied=True), seed=3)


def _check_numerics(before: Module, after: Module, weights) -> None:
    assert_same_numerics(interpret_steps(before, weights), interpret_steps(after, weights))


def test_fuse_qkv(llama) -> None:
    module, weights = llama
    out, records = run_pipeline(module, weights, "fuse-qkv")
    assert stat(records, "fuse-qkv") == 2 * LAYERS  # prefill and decode
    before, after = _counts(module), _counts(out)
    assert before["linear"] - after["linear"] == 2 * LAYERS
    assert after["split"] == LAYERS
    text = print_function(out.functions["decode"])
    assert '= param {"name": "layers.0.qkv"} : float32[64, 32]' in text  # 32 q rows + 16 k + 16 v
    assert '{"sizes": [32, 16, 16]}' in text
    assert "layers.0.q" not in {str(n.attrs["name"]) for n in out.functions["decode"].nodes if n.op == "param"}
    np.testing.assert_array_equal(
        weights["layers.1.qkv"],
        np.concatenate([weights["layers.1.q"], weights["layers.1.k"], weights["layers.1.v"]]),
    )
    _check_numerics(module, out, weights)


def test_fuse_gate_up(llama) -> None:
    module, weights = llama
    out, records = run_pipeline(module, weights, "fuse-gate-up")
    assert stat(records, "fuse-gate-up") == 2 * LAYERS
    before, after = _counts(module), _counts(out)
    assert after["swiglu"] == LAYERS
    assert "silu" not in after and "mul" not in after
    assert before["linear"] - after["linear"] == LAYERS
    assert out.params["layers.0.gate_up"].type.shape == (96, 32)
    _check_numerics(module, out, weights)


def test_fuse_add_rmsnorm(llama) -> None:
    module, weights = llama
    out, records = run_pipeline(module, weights, "fuse-add-rmsnorm")
    # every residual add feeds a norm: 2 per layer (the last one feeds the final norm)
    assert stat(records, "fuse-add-rmsnorm") == 2 * 2 * LAYERS
    after = _counts(out)
    assert after["add_rms_norm"] == 2 * LAYERS
    assert "add" not in after
    assert after["rms_norm"] == 1  # the first layer's norm reads the embedding
    # the sum (result 1) of each fused op feeds the next fused op as its residual
    fused = [n for n in out.functions["decode"].nodes if n.op == "add_rms_norm"]
    for prev, nxt in itertools.pairwise(fused):
        assert nxt.inputs[0].node is prev and nxt.inputs[0].index == 1
    _check_numerics(module, out, weights)


def test_fold_rope(llama) -> None:
    module, weights = llama
    out, records = run_pipeline(module, weights, "fold-rope")
    assert stat(records, "fold-rope") == 2 * LAYERS
    after = _counts(out)
    assert after["rope_attention"] == LAYERS and "rope" not in after and "attention" not in after
    node = next(n for n in out.functions["decode"].nodes if n.op == "rope_attention")
    assert node.attrs["layer"] == 0 and node.attrs["style"] == "half" and node.attrs["rotary_dim"] == 8
    _check_numerics(module, out, weights)


def test_fold_rope_rejects_different_rope_settings() -> None:
    params = {"kv": ParamInfo("kv", TensorType((4,), "float32"))}
    b = Builder(params)
    q = b.input("q", TensorType(("t", 2, 4), "float32"))
    k = b.input("k", TensorType(("t", 2, 4), "float32"))
    pos = b.input("pos", TensorType(("t",), "int64"))
    kv = b.input("kv_cache", KV_CACHE_TYPE)
    rq = b.op("rope", q, pos, theta=10000.0, style="half", rotary_dim=4)
    rk = b.op("rope", k, pos, theta=500000.0, style="half", rotary_dim=4)
    a = b.op("attention", rq, rk, k, kv, layer=0, scale=0.5)
    module = Module({"f": b.function("f", {"a": a})}, {})
    _, records = run_pipeline(module, {}, "fold-rope")
    assert stat(records, "fold-rope") == 0 and stat(records, "fold-rope", "rejected") == 1
    assert records[0].rejections == {"rope-attention: q and k use different rope settings": 1}


def test_pack_qkv_attention(llama) -> None:
    module, weights = llama
    out, records = run_pipeline(module, weights, "fuse-qkv,fold-rope,pack-qkv-attention")
    assert stat(records, "pack-qkv-attention") == 2 * LAYERS
    after = _counts(out)
    assert after["packed_rope_attention"] == LAYERS
    assert "rope_attention" not in after and "split" not in after and "split_heads" not in after
    node = next(n for n in out.functions["decode"].nodes if n.op == "packed_rope_attention")
    assert (node.attrs["heads"], node.attrs["kv_heads"], node.attrs["head_dim"]) == (4, 2, 8)
    assert node.inputs[0].node.op == "linear"  # the fused qkv projection itself
    _check_numerics(module, out, weights)


def test_pack_qkv_attention_keeps_layers_of_other_sizes_and_needs_one_split(llama) -> None:
    module, weights = llama
    _, records = run_pipeline(module, weights, "fuse-qkv,fold-rope,pack-qkv-attention(head_dim_multiple=16)")
    assert stat(records, "pack-qkv-attention") == 0 and stat(records, "pack-qkv-attention", "rejected") == 2 * LAYERS
    assert all("head_dim % 16 == 0" in reason for reason in records[-1].rejections)
    _, records = run_pipeline(module, weights, "fold-rope,pack-qkv-attention")  # no fused qkv: nothing to pack
    assert stat(records, "pack-qkv-attention") == 0 and stat(records, "pack-qkv-attention", "rejected") == 0


def test_share_tied_weights(llama) -> None:
    module, weights = llama
    assert module.referenced_params() >= {"embed", "lm_head"}
    out, records = run_pipeline(module, weights, "share-tied-weights")
    assert stat(records, "share-tied-weights") == 2
    assert "lm_head" not in out.params and "lm_head" not in out.referenced_params()
    head = [n for n in out.functions["decode"].nodes if n.op == "linear"][-1]
    assert head.inputs[1].node.attrs["name"] == "embed"
    _check_numerics(module, out, weights)


def test_share_tied_weights_needs_tied_config_and_equal_weights() -> None:
    module, weights = random_llama(llama_config(tied=False), seed=1)
    out, records = run_pipeline(module, weights, "share-tied-weights")
    assert stat(records, "share-tied-weights") == 0 and "lm_head" in out.params
    assert records[0].rejections == {"tied-head: the config does not tie the head to the embedding": 2}
    module, weights = random_llama(llama_config(tied=True), seed=1)
    weights["lm_head"] = np.asarray(weights["embed"]) + 1  # claims tied, but differs
    _, records = run_pipeline(module, weights, "share-tied-weights")
    assert records[0].rejections == {"tied-head: lm_head weights differ from the embedding": 2}


def test_cse_merges_duplicates_but_never_side_effects() -> None:
    params = {"n": ParamInfo("n", TensorType((4,), "float32"))}
    b = Builder(params)
    x = b.input("x", TensorType(("t", 2, 4), "float32"))
    pos = b.input("pos", TensorType(("t",), "int64"))
    kv = b.input("kv_cache", KV_CACHE_TYPE)
    r1 = b.op("rope", x, pos, theta=10000.0, style="half", rotary_dim=4)
    r2 = b.op("rope", x, pos, theta=10000.0, style="half", rotary_dim=4)
    r3 = b.op("rope", x, pos, theta=10000.0, style="interleaved", rotary_dim=4)
    a1 = b.op("attention", r1, r2, r3, kv, layer=0, scale=0.5)
    a2 = b.op("attention", r1, r2, r3, kv, layer=0, scale=0.5)  # same operands: must stay
    m1 = b.op("mul", b.op("silu", b.op("merge_heads", a1)), b.op("merge_heads", a2))
    m2 = b.op("mul", b.op("silu", b.op("merge_heads", a1)), b.op("merge_heads", a2))
    module = Module({"f": b.function("f", {"o": b.op("add", m1, m2)})}, params)
    out, records = run_pipeline(module, {}, "cse")
    counts = out.functions["f"].op_counts()
    assert counts["attention"] == 2
    assert counts["rope"] == 2  # r1 == r2, r3 differs in style
    assert counts["merge_heads"] == 2 and counts["silu"] == 1 and counts["mul"] == 1
    assert stat(records, "cse", "nodes_merged") == 5


def test_cse_on_llama_merges_the_shared_embedding_param(llama) -> None:
    module, weights = llama
    out, records = run_pipeline(module, weights, "share-tied-weights,cse")
    embed_nodes = [n for n in out.functions["decode"].nodes if n.op == "param" and n.attrs["name"] == "embed"]
    assert len(embed_nodes) == 1 and stat(records, "cse", "nodes_merged") == 2
    _check_numerics(module, out, weights)


def test_dce_removes_dead_nodes_keeps_side_effects_and_drops_params() -> None:
    params = {"a": ParamInfo("a", TensorType((4, 8), "float32")), "b": ParamInfo("b", TensorType((4, 8), "float32"))}
    b = Builder(params)
    x = b.input("x", TensorType(("t", 2, 4), "float32"))
    unused_input = b.input("unused", TensorType(("t",), "int64"))
    kv = b.input("kv_cache", KV_CACHE_TYPE)
    b.op("attention", x, x, x, kv, layer=0, scale=0.5)  # result unused, appends to the cache
    flat = b.op("merge_heads", x)
    b.op("linear", flat, b.param("b"))  # dead
    y = b.op("linear", flat, b.param("a"))
    module = Module({"f": b.function("f", {"y": y})}, params)
    out, records = run_pipeline(module, {}, "dce")
    counts = out.functions["f"].op_counts()
    assert counts == {"attention": 1, "input": 3, "linear": 1, "merge_heads": 1, "param": 1}
    assert set(out.params) == {"a"}
    assert unused_input.node in out.functions["f"].nodes
    assert stat(records, "dce", "nodes_removed") == 2 and stat(records, "dce", "params_removed") == 1


def test_quantized_qkv_concatenates_rows_exactly() -> None:
    spec = QuantSpec(4, 8, False)
    config = llama_config(layers=1)
    quant = {f"layers.0.{p}": spec for p in ("q", "k", "v")}
    module, weights = random_llama(config, seed=5, quant=quant)
    out, records = run_pipeline(module, weights, "fuse-qkv")
    assert stat(records, "fuse-qkv") == 2
    fused = weights["layers.0.qkv"]
    assert isinstance(fused, QuantizedTensor) and fused.spec == spec and fused.shape == (64, 32)
    assert out.params["layers.0.qkv"].quant == spec
    np.testing.assert_array_equal(
        fused.dequantize(), np.concatenate([weights[f"layers.0.{p}"].dequantize() for p in ("q", "k", "v")]))
    _check_numerics(module, out, weights)


def test_qkv_with_mismatched_quantization_is_rejected_with_reason() -> None:
    quant = {"layers.0.q": QuantSpec(4, 8, False), "layers.0.k": QuantSpec(8, 8, True)}
    module, weights = random_llama(llama_config(layers=1), seed=2, quant=quant)
    out, records = run_pipeline(module, weights, "fuse-qkv")
    assert stat(records, "fuse-qkv") == 0
    assert records[0].rejections == {"qkv: weights are quantized differently": 2}
    assert out.functions["decode"].op_counts() == module.functions["decode"].op_counts()


def test_fusion_names_and_concatenation_errors() -> None:
    assert fused_name(["layers.3.q", "layers.3.k", "layers.3.v"], "qkv") == "layers.3.qkv"
    assert fused_name(["a", "b"], "ab") == "ab"
    q = QuantizedTensor(QuantSpec(8, 4, True), (2, 4), np.zeros((2, 4), np.uint8), np.ones((2, 1), np.float16))
    with pytest.raises(ValueError, match="quantized with plain"):
        concat_rows([q, np.zeros((2, 4), np.float32)])
    with pytest.raises(ValueError, match="dtype or input width"):
        concat_rows([np.zeros((2, 4), np.float32), np.zeros((2, 4), np.float16)])


def test_passes_do_not_modify_their_input(llama) -> None:
    module, weights = llama
    before = {name: print_function(fn) for name, fn in module.functions.items()}
    params = dict(module.params)
    run_pipeline(module, weights, 2)
    assert {name: print_function(fn) for name, fn in module.functions.items()} == before
    assert module.params == params


def test_every_pass_has_a_name_and_a_doc() -> None:
    for p in parse_pipeline("dce,cse,fuse-qkv,fuse-gate-up,fuse-add-rmsnorm,fold-rope,share-tied-weights"):
        assert p.name and p.doc and p.produces <= FUSED_OPS
    assert isinstance(PassContext(weights={}, target_ops=frozenset()).derived_params, dict)  # type: ignore[arg-type]
