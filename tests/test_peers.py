"""benchmarks/peers.py: peers run the same model as llmc (same greedy tokens) and report in the same schema."""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import pytest

from llmc.runtime.bench import BenchSettings, LlmcBackend, Report, make_prompts, validate
from llmc.runtime.bench.harness import run_backend
from tests.helpers import load_script

pytest.importorskip("jsonschema", reason="bench report validation needs jsonschema (the `bench` extra)")
PEERS = Path(__file__).resolve().parents[1] / "benchmarks" / "peers.py"


def _peers() -> ModuleType:
    return load_script(PEERS, "llmc_bench_peers")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from llmc.driver import CompileOptions, compile_model
    from llmc.synth import synthesize

    root = tmp_path_factory.mktemp("peers")
    hf = synthesize("tiny", root / "hf", seed=1, dtype="float32")
    gguf = synthesize("tiny", root / "tiny.gguf", fmt="gguf", seed=1, dtype="float32")
    return {"hf": hf, "gguf": gguf, "art": compile_model(hf, root / "art", CompileOptions())}


def _check_against_llmc(backend, tiny: dict[str, Path]) -> None:
    llmc = LlmcBackend(tiny["art"], threads=1)
    prompts = make_prompts(3, 7, 512, seed=2, run=0)
    assert backend.run_batch(prompts, 6).token_ids == llmc.run_batch(prompts, 6).token_ids
    assert [r.token_ids for r in backend.run_concurrent(prompts, 6)] == llmc.run_batch(prompts, 6).token_ids
    settings = BenchSettings(scenarios=("single", "batch"), batch_sizes=(2,), prompt_len=4, gen_len=3, warmup=0,
                             repeat=1, threads=1)
    info, rows = run_backend(backend, settings, 512, bandwidth=1e10)
    report = Report(machine={"cpu_model": "x", "cpu_flags": [], "logical_cores": 1, "physical_cores": 1,
                             "memory_bytes": 1, "os": "x", "python": "3", "load_average": None, "gpu": None},
                    software={"llmc": "0"}, bandwidth=None, settings=settings.to_dict(),
                    model={"name": "tiny", "vocab_size": 512, "num_layers": 2, "hidden_size": 64},
                    backends=[info.to_dict()], results=rows)
    validate(report.to_dict())
    assert all(r["error"] is None for r in rows), rows
    assert info.weight_bytes > 0 and 0 < info.weight_bytes_per_step <= info.weight_bytes + info.embed_row_bytes


def test_transformers_peer_runs_the_same_model(tiny: dict[str, Path]) -> None:
    pytest.importorskip("transformers", reason="the hf-eager peer is transformers")
    peers = _peers()
    backend = peers.HFBackend(str(tiny["hf"]), threads=1)
    _check_against_llmc(backend, tiny)
    info = backend.info()
    assert info.engine == "hf-eager" and info.weight_bytes_per_step == info.weight_bytes + info.embed_row_bytes


def test_llama_cpp_peer_runs_the_same_model(tiny: dict[str, Path]) -> None:
    pytest.importorskip("llama_cpp", reason="llama-cpp-python (the `peers` extra) is not installed")
    peers = _peers()
    backend = peers.LlamaCppBackend(str(tiny["gguf"]), threads=1, max_seqs=3, max_len=16)
    _check_against_llmc(backend, tiny)
    backend.close()


def test_unknown_engine_is_a_clear_error() -> None:
    from llmc.errors import LlmcError

    peers = _peers()
    with pytest.raises(LlmcError, match="unknown engine 'vllm'"):
        peers.make_backend({"engine": "vllm", "settings": {"threads": 1}})
