"""The engine over the ONNX target's slot cache: concurrent greedy requests equal each alone."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.driver import CompileOptions, compile_model
from llmc.errors import UnsupportedError
from llmc.runtime.engine import Engine
from tests.runtime.test_engine_torch import _alone, _workload

pytest.importorskip("onnxruntime", reason="the onnx target needs onnxruntime (the `onnx` extra)")
pytest.importorskip("onnx", reason="the onnx target needs onnx (the `onnx` extra)")


def test_32_concurrent_greedy_requests_match_alone_onnx(tiny_hf: Path, tmp_path: Path) -> None:
    art = compile_model(tiny_hf, tmp_path / "tiny_onnx", CompileOptions(target="onnx"))
    prompts, params = _workload()
    with Engine.load(str(art), max_running=32, max_num_tokens=64) as engine:
        assert engine.executor.kv_spec().layout == "slots"
        together = engine.generate(prompts, params)
        alone = _alone(engine, prompts, params)
        stats = engine.stats()
    assert [o.token_ids for o in together] == alone
    assert stats["kv_used_blocks"] == 0 and stats["requests_finished"] == 64
    with pytest.raises(UnsupportedError, match="deterministic"):
        Engine.load(str(art), deterministic=True)
