"""Bad CLI values end in one clear error, never a traceback or silent acceptance (issue 19, item 9)."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import main


@pytest.fixture(scope="module")
def artifact(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmc.driver import CompileOptions, compile_model

    return compile_model(tiny_hf, tmp_path_factory.mktemp("cli_values") / "art", CompileOptions(opt_level=0))


def _invoke(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(main, list(args))
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return result.exit_code, result.output


@pytest.mark.parametrize(("args", "message"), [
    (["--threads", "-2"], "-2 is not in the range"),
    (["--threads", "0"], "0 is not in the range"),
    (["--seed", "-1"], "-1 is not in the range"),
    (["--max-running", "0"], "0 is not in the range"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--top-p", "nan"], "top_p must be a finite number"),
    (["--top-k", "-3"], "top_k must be >= 0"),
    (["--max-tokens", "0"], "max_tokens must be at least 1"),
    (["--device", "nope"], "unknown device 'nope'"),
    (["--device", "cuda:x"], "unknown device 'cuda:x'"),
])
def test_run_refuses_bad_values(artifact: Path, args: list[str], message: str) -> None:
    code, output = _invoke("run", str(artifact), "--prompt-ids", "1 2", "--max-tokens", "2", *args)
    assert code == 2 and message in output, output


def test_bench_and_eval_refuse_bad_values(artifact: Path, tmp_path: Path) -> None:
    for args in (["bench", str(artifact), "--threads", "-1"], ["bench", str(artifact), "--seed", "-4"],
                 ["bench", str(artifact), "--repeat", "0"], ["eval", str(artifact), "--ids-file", "x", "--window", "0"],
                 ["bench", str(artifact), "--device", "tpu", "--quiet", "--prompt-len", "4", "--gen-len", "2",
                  "--repeat", "1", "--warmup", "0", "--bandwidth-mib", "1"]):
        code, output = _invoke(*args)
        assert code == 2, (args, output)


@pytest.mark.parametrize(("args", "message"), [
    (["--device", "nope"], "unknown device 'nope' for this target; it builds for cpu, cuda"),
    (["--target-option", "blok_size=8"], "does not take the compile option blok_size; its compile options: "
                                         "activation_dtype, block_size, kv_cache_dtype, quant_kernels, step"),
    (["--arch", "x86-64-v3"], "does not take the compile option arch"),  # a torch build ignores --arch
    (["--tune", "8"], "does not take the compile option tune"),
    (["--target-option", "device=cuda"], "does not take the compile option device"),  # --device is the flag
    (["--target-option", "block_size=abc"], "compile option block_size expects an integer, got 'abc'"),
    (["--target-option", "block_size=0"], "compile option block_size must be at least 1"),
    (["--target-option", "quant_kernels=fast"], "quant_kernels must be one of auto, torch, dequant"),
    (["--target-option", "kv_cache_dtype=int8"], "kv_cache_dtype must be one of auto, float32, float16, bfloat16"),
    (["--target-option", "activation_dtype=int3"], "activation_dtype must be one of float32, float16, bfloat16"),
    (["--group-size", "-32"], "-32 is not in the range"),
])
def test_compile_refuses_bad_values_and_writes_nothing(tiny_hf: Path, tmp_path: Path, args: list[str],
                                                       message: str) -> None:
    out = tmp_path / "art"
    code, output = _invoke("compile", str(tiny_hf), "-o", str(out), *args)
    assert code == 2 and message in output, output
    assert not out.exists() and list(tmp_path.iterdir()) == []


def test_compile_target_options_are_typed(tiny_hf: Path, tmp_path: Path) -> None:
    import json

    code, output = _invoke("compile", str(tiny_hf), "-o", str(tmp_path / "art"), "--opt-level", "0",
                           "--target-option", "block_size=8", "--target-option", "quant_kernels=dequant")
    assert code == 0, output
    manifest = json.loads((tmp_path / "art" / "manifest.json").read_text())
    assert manifest["target"]["options"]["block_size"] == 8
    assert manifest["compile_options"]["target_options"] == {"block_size": 8, "quant_kernels": "dequant"}
