"""KV budgets (``kv_memory``, ``gpu_memory_utilization``, ``max_model_len``), preemption instead of running
out, and the capacity report (``llmc inspect``, ``llmc compile``), checked against hand-computed numbers."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import InputError, LlmcError
from llmc.compiler.options import parse_bytes
from llmc.runtime.capacity import Capacity, activation_reserve, kv_bytes_per_token
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.errors import ContextLengthError
from llmc.runtime.loader import kv_blocks
from llmc.runtime.sampling import SamplingParams
from tests.runtime.fakes import FakeExecutor, reference

LLAMA_1B = ModelConfig(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32,
                       num_kv_heads=8, head_dim=64, max_position=131072)


def test_parse_bytes() -> None:
    assert parse_bytes("8GiB") == 8 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    assert parse_bytes("2.5GB") == 2_500_000_000 and parse_bytes("4e9") == 4_000_000_000 and parse_bytes(123) == 123
    for bad in ("", "GiB", "8XB", "-1GiB", "0"):
        with pytest.raises(InputError, match="--kv-cache-memory"):
            parse_bytes(bad, "--kv-cache-memory")


def test_llama_1b_kv_bytes_and_sequences() -> None:
    # 2 (K, V) x 16 layers x 8 kv heads x 64 dims x 2 bytes (bf16) = 32 KiB per token
    assert kv_bytes_per_token(LLAMA_1B, "bfloat16") == 32768 and kv_bytes_per_token(LLAMA_1B, "float32") == 65536
    reserve = activation_reserve(LLAMA_1B, 512, 256)
    assert reserve == (256 << 20) + 512 * (6 * 2048 + 3 * 8192) * 4 + 256 * 128256 * 16
    cap = Capacity(weight_bytes=2_471_000_000, kv_bytes_per_token=32768, block_size=16, memory_bytes=8 << 30,
                   reserve_bytes=reserve, context_length=131072)
    kv = (8 << 30) - 2_471_000_000 - reserve
    assert cap.kv_budget_bytes == kv
    assert cap.sequences(2048) == kv // (2048 * 32768) and cap.sequences(2040) == cap.sequences(2048)  # whole blocks
    assert cap.tokens() == kv // 32768 // 16 * 16
    assert "sequences of 2048 tokens" in cap.line(2048)


def test_default_kv_cache_follows_max_model_len() -> None:
    spec = FakeExecutor(max_position=256, block_size=4).kv_spec()
    assert kv_blocks(spec, 8) == 8 * 64  # full context: 256 / 4 blocks per sequence
    assert kv_blocks(spec, 8, max_model_len=30) == 8 * 8
    assert kv_blocks(spec, 8, max_model_len=30, budget=64 * 10) == 10  # the byte cap still holds
    with pytest.raises(LlmcError, match="max_model_len"):
        kv_blocks(spec, 8, max_model_len=0)


def test_max_model_len_refuses_longer_requests_and_bounds_max_tokens_none() -> None:
    ex = FakeExecutor(vocab=64, max_position=256, block_size=4)
    with Engine(ex, config=EngineConfig(max_running=4, max_model_len=40)) as engine:
        assert engine.kv.num_blocks == 4 * 10
        with pytest.raises(ContextLengthError) as err:
            engine.generate([[5] * 30], SamplingParams(max_tokens=20))
        assert err.value.context_length == 40
        out = engine.generate([[5, 6]], SamplingParams(max_tokens=None, temperature=0, ignore_eos=True))[0]
        assert len(out.token_ids) == 38
    with pytest.raises(LlmcError, match="max_model_len must be an integer from 1"):
        Engine(FakeExecutor(max_position=64), config=EngineConfig(max_model_len=65))


def test_a_small_kv_memory_preempts_instead_of_failing() -> None:
    ex = FakeExecutor(vocab=64, max_position=256, block_size=4)  # 64 bytes per block
    prompts = [[3 + (i * 7 + k) % 60 for k in range(20)] for i in range(8)]
    with Engine(ex, config=EngineConfig(max_running=8, max_num_tokens=64, kv_memory=64 * 24)) as engine:
        assert engine.kv.num_blocks == 24  # 96 tokens for 8 requests of 50
        outs = engine.generate(prompts, SamplingParams(max_tokens=30, temperature=0, ignore_eos=True))
        stats = engine.stats()
    assert [o.token_ids for o in outs] == [reference(p, 30, 64) for p in prompts]
    assert stats["num_preemptions"] > 0 and stats["kv_used_blocks"] == 0


class _GpuLikeFake(FakeExecutor):
    def __init__(self, free: int, total: int, **kwargs: object) -> None:
        super().__init__(**kwargs)  # type: ignore[arg-type]
        self.memory = (free, total)

    def device_memory(self) -> tuple[int, int]:
        return self.memory


def test_gpu_memory_utilization_takes_what_weights_and_activations_leave() -> None:
    total, used = 10 << 30, 3 << 30
    ex = _GpuLikeFake(total - used, total, vocab=64, max_position=256, block_size=4)
    with Engine(ex, config=EngineConfig(max_running=4, max_num_tokens=16, gpu_memory_utilization=0.5)) as engine:
        reserve = activation_reserve(ex.config, 16, 4)
        assert engine.kv.num_blocks == (int(0.5 * total) - used - reserve) // 64
    with pytest.raises(LlmcError, match="leaves no room"):
        Engine(_GpuLikeFake(1 << 30, total, vocab=64), config=EngineConfig(gpu_memory_utilization=0.5))
    with pytest.raises(LlmcError, match="needs an executor on a GPU"):
        Engine(FakeExecutor(), config=EngineConfig(gpu_memory_utilization=0.5))
    with pytest.raises(LlmcError, match="not several"):
        Engine(ex, config=EngineConfig(gpu_memory_utilization=0.5, kv_memory=1 << 20))
    with pytest.raises(LlmcError, match="fraction"):
        Engine(ex, config=EngineConfig(gpu_memory_utilization=1.5))


def test_inspect_and_compile_print_the_capacity(tiny_hf: Path, tmp_path: Path) -> None:
    import json

    runner = CliRunner()
    res = runner.invoke(main, ["compile", str(tiny_hf), "-o", str(tmp_path / "a")])
    assert res.exit_code == 0, res.output
    assert "capacity: weights" in res.output and "sequences of 128 tokens" in res.output
    res = runner.invoke(main, ["inspect", str(tmp_path / "a"), "--json", "--memory", "1GiB", "--seq-lens", "64,128"])
    cap = json.loads(res.output)["capacity"]
    # tiny_hf: 2 layers x 2 kv heads x 16 dims x 2 x float32 = 512 bytes per token
    assert cap["kv_bytes_per_token"] == 512 and cap["memory_bytes"] == 1 << 30 and cap["block_size"] == 16
    assert cap["sequences"]["128"] == cap["kv_budget_bytes"] // (128 * 512)
    assert cap["kv_budget_bytes"] == (1 << 30) - cap["weight_bytes"] - cap["reserve_bytes"]
    text = runner.invoke(main, ["inspect", str(tmp_path / "a"), "--memory", "1GiB"]).output
    assert "tokens/sequence" in text and "capacity" in text


def test_serve_takes_the_kv_budget_options(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    seen: dict = {}
    import llmc.runtime.server.serve as serve_mod

    monkeypatch.setattr(serve_mod, "serve", lambda path, **kw: seen.update(kw))
    monkeypatch.setattr(serve_mod, "check_dependencies", lambda: None)
    art = tmp_path / "art"
    (art).mkdir()
    (art / "manifest.json").write_text("{}")
    runner = CliRunner()
    res = runner.invoke(main, ["serve", str(art), "--kv-cache-memory", "6GiB", "--max-model-len", "2048"])
    assert res.exit_code == 0, res.output
    assert seen["kv_memory"] == 6 << 30 and seen["max_model_len"] == 2048 and seen.get("gpu_memory_utilization") is None
    res = runner.invoke(main, ["serve", str(art), "--gpu-memory-utilization", "0.3", "--kv-cache-memory", "1GiB"])
    assert res.exit_code == 2 and "not both" in res.output
    res = runner.invoke(main, ["serve", str(art), "--gpu-memory-utilization", "0.3"])
    assert res.exit_code == 0 and seen["gpu_memory_utilization"] == 0.3


def test_each_target_reports_its_kv_layout(tmp_path: Path) -> None:
    """The default reads the recorded options (a slot cache holds a whole context per sequence); tvm
    reads its payload's page size and KV dtype."""
    import json
    from types import SimpleNamespace

    from llmc.runtime.registry import get_target

    config = ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                         num_kv_heads=2, head_dim=16, max_position=128)
    torch_art = SimpleNamespace(config=config, target_options={"activation_dtype": "bfloat16", "block_size": 32})
    assert get_target("torch").kv_layout(torch_art) == (2 * 2 * 2 * 16 * 2, 32)
    quantized = {"embed": {"shape": [64, 64]}, "layers.0.q": {"shape": [64, 64], "quant": "ggml_q4_k"}}
    native_art = SimpleNamespace(config=config, target_options={}, manifest={"params": quantized})
    assert get_target("torch").kv_layout(native_art) == (2 * 2 * 2 * 16 * 2, 16)  # the native step: float16
    float_art = SimpleNamespace(config=config, target_options={}, manifest={"params": {
        **quantized, "layers.0.k": {"shape": [64, 64], "dtype": "float32"}}})
    assert get_target("torch").kv_layout(float_art) == (2 * 2 * 2 * 16 * 4, 16)  # torch ops: the activations'
    forced = SimpleNamespace(config=config, target_options={"kv_cache_dtype": "float32"})
    assert get_target("torch").kv_layout(forced) == (2 * 2 * 2 * 16 * 4, 16)
    onnx_art = SimpleNamespace(config=config, target_options={})
    assert get_target("onnx").kv_layout(onnx_art) == (2 * 2 * 2 * 16 * 4, 128)
    (tmp_path / "target" / "tvm").mkdir(parents=True)
    (tmp_path / "target" / "tvm" / "tvm.json").write_text(json.dumps({"kv_dtype": "float16", "page_size": 8}))
    tvm_art = SimpleNamespace(config=config, target_options={}, file=lambda rel: tmp_path / rel)
    assert get_target("tvm").kv_layout(tvm_art) == (2 * 2 * 2 * 16 * 2, 8)
