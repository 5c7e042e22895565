"""Property tests: random small Llama-like graphs keep their numerics through every
pipeline and through random pass orders (hypothesis; derandomized in CI by conftest)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from llmc.compiler.config import ModelConfig
from llmc.compiler.ir.ops import FUSED_OPS
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.ir.verify import verify_module
from llmc.passes.pipelines import PIPELINES
from tests.passes.util import assert_same_numerics, interpret_steps, random_llama, run_pipeline

ALL_PASSES = ["dce", "cse", "share-tied-weights", "fuse-qkv", "fuse-gate-up", "fuse-add-rmsnorm", "fold-rope"]


@st.composite
def configs(draw: st.DrawFn) -> ModelConfig:
    kv_heads = draw(st.sampled_from([1, 2, 3]))
    heads = kv_heads * draw(st.sampled_from([1, 2, 3]))
    head_dim = draw(st.sampled_from([2, 4, 6, 8]))
    return ModelConfig(
        vocab_size=draw(st.integers(8, 40)),
        hidden_size=draw(st.sampled_from([8, 12, 16, 24])),
        intermediate_size=draw(st.integers(4, 40)),
        num_layers=draw(st.integers(1, 3)),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        max_position=32,
        rope_style=draw(st.sampled_from(["half", "interleaved"])),
        rotary_dim=draw(st.sampled_from([d for d in (2, 4, 6, 8) if d <= head_dim])),
        rope_theta=draw(st.sampled_from([10000.0, 500000.0])),
        tie_word_embeddings=draw(st.booleans()),
    )


@given(config=configs(), seed=st.integers(0, 2**16), quantize_attention=st.booleans())
def test_every_pipeline_keeps_numerics(config: ModelConfig, seed: int, quantize_attention: bool) -> None:
    quant = None
    if quantize_attention and config.hidden_size % 4 == 0:
        spec = QuantSpec(4, 4, False)
        quant = {f"layers.{i}.{p}": spec for i in range(config.num_layers) for p in ("q", "k", "v")}
    module, weights = random_llama(config, seed=seed, quant=quant)
    expected = interpret_steps(module, weights, seed=seed)
    for level in range(len(PIPELINES)):
        out, _ = run_pipeline(module, weights, level)
        verify_module(out)
        assert_same_numerics(expected, interpret_steps(out, weights, seed=seed))
        if level >= 2:
            counts = out.functions["decode"].op_counts()
            assert counts["linear"] == 4 * config.num_layers + 1  # qkv, o, gate_up, down + head
            assert counts["split"] == config.num_layers
            assert out.referenced_params() == set(out.params)
            if config.tie_word_embeddings:
                assert "lm_head" not in out.params


@given(config=configs(), seed=st.integers(0, 2**16),
       order=st.lists(st.sampled_from(ALL_PASSES), min_size=1, max_size=9))
def test_random_pass_orders_keep_numerics(config: ModelConfig, seed: int, order: list[str]) -> None:
    module, weights = random_llama(config, seed=seed)
    expected = interpret_steps(module, weights, seed=seed)
    out, _ = run_pipeline(module, weights, ",".join(order), target_ops=FUSED_OPS)
    assert_same_numerics(expected, interpret_steps(out, weights, seed=seed))
