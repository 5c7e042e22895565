"""Helpers for pass tests: random Llama modules in memory, pipelines, interpreter runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.config import ModelConfig
from llmc.compiler.frontends.llama import build_module, declare_params, param_shapes
from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.interp import Interpreter, NumpyKVCache
from llmc.compiler.ir.ops import FUSED_OPS
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor, WeightStore, pack_codes
from llmc.passes.base import PassContext
from llmc.passes.manager import PassManager, PassRecord
from llmc.passes.pipelines import parse_pipeline, pipeline_for


def llama_config(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 8, hidden: int = 32,
                 inter: int = 48, vocab: int = 64, tied: bool = False, rope_style: str = "half") -> ModelConfig:
    return ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_layers=layers,
                       num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim, max_position=64,
                       rope_style=rope_style, tie_word_embeddings=tied, bos_token_id=1, eos_token_ids=(2,))


def random_quantized(rng: np.random.Generator, shape: tuple[int, int], spec: QuantSpec) -> QuantizedTensor:
    out, inp = shape
    groups = -(-inp // spec.group_size)
    codes = rng.integers(0, 2**spec.bits, size=(out, inp), dtype=np.uint8)
    scales = (rng.random((out, groups)) * 0.02 + 0.01).astype(np.float16)
    offsets = None if spec.symmetric else (rng.standard_normal((out, groups)) * 0.05).astype(np.float16)
    return QuantizedTensor(spec, shape, pack_codes(codes, spec.bits), scales, offsets)


def random_llama(config: ModelConfig, seed: int = 0, quant: dict[str, QuantSpec] | None = None
                 ) -> tuple[Module, WeightStore]:
    """A module built by the Llama front end over seeded random weights (``quant``: param
    name -> spec for params to store quantized). Tied configs share one embedding array."""
    rng = np.random.default_rng(seed)
    store = WeightStore()
    for name, shape in param_shapes(config).items():
        if name == "lm_head" and config.tie_word_embeddings:
            store[name] = store["embed"]
        elif quant and name in quant:
            store[name] = random_quantized(rng, shape, quant[name])  # type: ignore[arg-type]
        elif len(shape) == 1:
            store[name] = rng.uniform(0.8, 1.2, shape).astype(np.float32)
        else:
            store[name] = (rng.standard_normal(shape) * 0.2).astype(np.float32)
    params = declare_params(config, store, "random")
    return build_module(config, params), store


def run_pipeline(module: Module, weights: WeightStore, pipeline: str | int, target_ops: frozenset[str] = FUSED_OPS,
                 dump_dir: Path | None = None) -> tuple[Module, list[PassRecord]]:
    """Run ``O<n>`` (an int) or a custom pass string; returns the module and the records."""
    passes = pipeline_for(pipeline, target_ops) if isinstance(pipeline, int) else parse_pipeline(pipeline)
    manager = PassManager(passes, dump_dir=dump_dir)
    out = manager.run(module, PassContext(weights=weights, target_ops=target_ops))
    return out, manager.records


def interpret_steps(module: Module, weights: WeightStore, seed: int = 0, vocab: int | None = None
                    ) -> list[np.ndarray]:
    """Logits of a batched prefill of two sequences (all rows), then two batched decode
    steps, through the reference interpreter in float64 on random token ids."""
    vocab = vocab or int(module.config["vocab_size"])
    rng = np.random.default_rng(seed)
    interp = Interpreter(module, weights)
    kv = NumpyKVCache()
    lens = (5, 3)
    layout = BatchLayout((0, 1), lens, lens)
    ids = rng.integers(0, vocab, size=sum(lens))
    out = [interp.run("prefill", {"input_ids": ids, "positions": np.asarray(layout.positions()),
                                  "logits_index": np.arange(sum(lens))}, layout, kv)["logits"]]
    ctx = list(lens)
    for _ in range(2):
        ctx = [c + 1 for c in ctx]
        layout = BatchLayout((0, 1), (1, 1), tuple(ctx))
        ids = rng.integers(0, vocab, size=2)
        out.append(interp.run("decode", {"input_ids": ids, "positions": np.asarray(layout.positions())},
                              layout, kv)["logits"])
    return out


def executor_steps(executor: Any, vocab: int, seed: int = 0) -> list[np.ndarray]:
    """The schedule and token ids of :func:`interpret_steps`, run on an executor."""
    from tests.helpers import SequenceDriver

    driver = SequenceDriver(executor)
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, vocab, size=8)
    out = [np.concatenate(driver.step({0: list(ids[:5]), 1: list(ids[5:])}))]
    for _ in range(2):
        nxt = rng.integers(0, vocab, size=2)
        out.append(np.concatenate(driver.step({0: [int(nxt[0])], 1: [int(nxt[1])]})))
    return out


def assert_same_numerics(a: list[np.ndarray], b: list[np.ndarray], tol: float = 1e-10) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        scale = max(1.0, float(np.abs(x).max()))
        np.testing.assert_allclose(y, x, rtol=0, atol=tol * scale)


def stat(records: list[PassRecord], name: str, key: str = "matches") -> int:
    for r in records:
        if r.name == name:
            return int(r.stats.get(key, 0))
    raise KeyError(name)
