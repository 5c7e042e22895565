"""Absurd sizes are refused or bounded clearly, at compile and at load (issue 19, item 6): a context
of 2^40 tokens used to compile and then fail in an allocator (the KV cache was sized for a full context)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from llmc.compiler.config import MAX_POSITION, ModelConfig
from llmc.errors import ArtifactError, InputError, LlmcError, RequestError
from llmc.runtime.executor import KVSpec
from llmc.runtime.loader import DEFAULT_KV_BYTES, kv_blocks


def test_context_of_2_to_the_40_is_refused_at_compile(tiny_hf: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llmc.cli import main

    folder = Path(shutil.copytree(tiny_hf, tmp_path / "hf"))
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "max_position_embeddings": 2**40}))
    result = CliRunner().invoke(main, ["compile", str(folder), "-o", str(tmp_path / "art")])
    assert result.exit_code == 2 and "max_position (the context length) must be in [1, 1048576]" in result.output
    assert not (tmp_path / "art").exists()


def test_context_of_2_to_the_40_is_refused_at_load(tiny_hf: Path, tmp_path: Path) -> None:
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.artifact import Artifact

    art = compile_model(tiny_hf, tmp_path / "art", CompileOptions(opt_level=0))
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["model"]["max_position"] = 2**40
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="max_position"):
        Artifact.load(art)


def test_the_largest_context_is_accepted() -> None:
    ModelConfig(8, 8, 8, 1, 1, 1, 8, MAX_POSITION)
    with pytest.raises(InputError, match="max_position"):
        ModelConfig(8, 8, 8, 1, 1, 1, 8, MAX_POSITION + 1)
    with pytest.raises(InputError, match="vocab_size must be in"):
        ModelConfig(2**40, 8, 8, 1, 1, 1, 8, 16)


def test_the_kv_cache_is_bounded_even_when_one_sequence_does_not_fit() -> None:
    # a 1M-token context at 128 KiB per 16-token block: one full sequence would need 8 GiB
    spec = KVSpec("paged", 16, 128 << 10, MAX_POSITION // 16)
    blocks = kv_blocks(spec, max_running=32)
    assert blocks * spec.bytes_per_block <= DEFAULT_KV_BYTES
    assert kv_blocks(spec, 32, kv_memory=16 << 30) == (16 << 30) // spec.bytes_per_block  # asked for: given
    small = KVSpec("paged", 16, 1024, 8)
    assert kv_blocks(small, max_running=4) == 32  # small models: max_running full sequences, as before
    for bad in ({"num_blocks": -1}, {"kv_memory": 0}, {"num_blocks": True}):
        with pytest.raises(LlmcError, match="must be a positive integer"):
            kv_blocks(spec, 4, **bad)


def test_a_request_longer_than_the_bounded_cache_is_refused_with_the_numbers(tiny_hf: Path, tmp_path: Path) -> None:
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    art = compile_model(tiny_hf, tmp_path / "art", CompileOptions(opt_level=0))
    with Engine.load(str(art), num_blocks=2, block_size=16) as engine:  # 32 tokens of cache, a 128-token context
        assert engine.generate([[1, 2]], SamplingParams(max_tokens=4, temperature=0))[0].finish_reason == "length"
        with pytest.raises(RequestError, match=r"needs more than the whole kv cache \(2 blocks of 16\)"):
            engine.generate([[1] * 40], SamplingParams(max_tokens=4))


def test_evaluate_sizes_its_cache_by_the_text_not_the_context(tiny_hf: Path, tmp_path: Path) -> None:
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.evaluate import evaluate
    from llmc.runtime.loader import load_model

    art = compile_model(tiny_hf, tmp_path / "art", CompileOptions(opt_level=0))
    executor = load_model(art).executor
    sizes: list[int] = []
    init = executor.init_cache
    executor.init_cache = lambda n: (sizes.append(n), init(n))[1]  # type: ignore[method-assign]
    result = evaluate(executor, [1, 5, 9, 3, 7, 2, 4, 8])
    assert sizes == [1]  # 8 tokens: one 16-token block, not the 128-token context's 8
    assert result.tokens == 7
