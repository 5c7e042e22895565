"""Quantized compiles end to end: every scheme, the accuracy gate, escalation, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.compiler.ir.interp import Interpreter
from llmc.compiler.weights import QuantizedTensor
from llmc.driver import CompileOptions, compile_model
from llmc.errors import LlmcError, QualityGateError
from llmc.runtime.artifact import Artifact
from llmc.runtime.evaluate import evaluate
from llmc.runtime.loader import load_model
from tests.helpers import SequenceDriver


@pytest.fixture(scope="module")
def eval_ids(stories_expected_ids: list[int], tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("eval") / "ids.json"
    path.write_text(json.dumps([1, *stories_expected_ids]))
    return path


@pytest.fixture(scope="module")
def fp32_stories(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_model(stories_hf, tmp_path_factory.mktemp("fp32") / "a", CompileOptions())


@pytest.mark.parametrize(
    ("quant", "extra", "max_kl"),
    [("fp16", {}, 1e-5), ("bf16", {}, 1e-3), ("int8", {}, 3e-3), ("int4", {"group_size": 32}, 0.1),
     ("int4", {"group_size": 64, "sym": True}, 0.2)],
)
def test_each_scheme_end_to_end(stories_hf: Path, fp32_stories: Path, eval_ids: Path, tmp_path: Path,
                                quant: str, extra: dict, max_kl: float) -> None:
    path = compile_model(stories_hf, tmp_path / "q", CompileOptions(quant=quant, **extra))
    art = Artifact.load(path)
    assert art.manifest["quantization"]["mode"] == quant
    model = load_model(str(path))
    ids = json.loads(eval_ids.read_text())
    # the torch executor (float activations) and the reference interpreter agree on the same quantized weights
    driver = SequenceDriver(load_model(str(path), quant_kernels="dequant").executor)
    got = driver.step({0: ids[:40]})[0]
    interp = Interpreter(art.module, art.weights(), dtype=np.float64)
    from llmc.compiler.ir.batch import BatchLayout
    from llmc.compiler.ir.interp import NumpyKVCache

    want = interp.run("prefill", {"input_ids": np.asarray(ids[:40]), "positions": np.arange(40),
                                  "logits_index": np.arange(40)}, BatchLayout((0,), (40,), (40,)), NumpyKVCache())
    np.testing.assert_allclose(got, want["logits"], rtol=0, atol=1e-4 * np.abs(want["logits"]).max())
    # and the quantized model as it runs by default (CPU: int8 activations) stays close to fp32
    result = evaluate(model.executor, ids, reference=load_model(str(fp32_stories)).executor)
    assert result.kl_mean is not None and result.kl_mean < max_kl
    assert result.top1_agreement is not None and result.top1_agreement > 0.85
    if quant.startswith("int"):
        sizes = {r: art.manifest["files"][r]["bytes"] for r in art.manifest["files"]}
        fp32_size = Artifact.load(fp32_stories).manifest["files"]["weights/model.safetensors"]["bytes"]
        assert sizes["weights/model.safetensors"] < fp32_size / (3 if quant == "int8" else 4)


def test_gate_fails_on_a_tiny_budget_and_writes_nothing(stories_hf: Path, eval_ids: Path, tmp_path: Path) -> None:
    out = tmp_path / "never"
    options = CompileOptions(quant="int4", eval_file=eval_ids, max_ppl_increase="0.01%")
    with pytest.raises(QualityGateError, match=r"exceeds --max-ppl-increase 0\.01%"):
        compile_model(stories_hf, out, options)
    assert not out.exists()
    assert not list(tmp_path.iterdir())  # not even a temporary directory is left


def test_gate_passes_and_records_quality(stories_hf: Path, eval_ids: Path, tmp_path: Path) -> None:
    path = compile_model(stories_hf, tmp_path / "ok",
                         CompileOptions(quant="int8", eval_file=eval_ids, max_ppl_increase="1%"))
    quality = Artifact.load(path).manifest["quality"]
    assert quality["passed"] and quality["ppl_increase"] <= 0.01
    assert quality["tokens"] == 200 and quality["quantized"]["kl_mean"] > 0


def test_auto_escalate_raises_the_measured_most_sensitive_layers(stories_hf: Path, eval_ids: Path,
                                                                 tmp_path: Path) -> None:
    options = CompileOptions(quant="int4", eval_file=eval_ids, max_ppl_increase="1%", auto_escalate=True)
    path = compile_model(stories_hf, tmp_path / "esc", options)
    m = Artifact.load(path).manifest
    esc = m["quality"]["escalation"]
    assert m["quality"]["passed"] and m["quality"]["ppl_increase"] <= 0.01
    assert esc["escalated"] and esc["escalated"] == m["quantization"]["escalated"]
    sens = esc["sensitivity_kl"]
    assert esc["escalated"][0] == max(sens, key=sens.get)  # the most sensitive unit went first
    params = m["quantization"]["params"]
    first = esc["escalated"][0]
    assert all(not v.startswith("int4") for k, v in params.items() if k.startswith(first + "."))
    untouched = [u for u in sens if u not in esc["escalated"] and u.startswith("layers.")]
    for unit in untouched:
        assert any(v.startswith("int4") for k, v in params.items() if k.startswith(unit + "."))
    # the recorded precisions are the stored ones
    weights = Artifact.load(path).weights()
    for name, desc in params.items():
        w = weights[name]
        assert (w.spec.describe() if isinstance(w, QuantizedTensor) else str(np.asarray(w).dtype)) == desc


def test_calibrated_int4_records_awq(stories_hf: Path, eval_ids: Path, tmp_path: Path) -> None:
    ids = json.loads(eval_ids.read_text())
    calib = tmp_path / "calib.json"
    calib.write_text(json.dumps(ids[:120]))
    path = compile_model(stories_hf, tmp_path / "awq", CompileOptions(quant="int4", calib_file=calib))
    cal = Artifact.load(path).manifest["quantization"]["calibration"]
    assert cal["method"] == "awq" and cal["tokens"] == 120 and cal["awq_groups"] == 15
    assert cal["awq_err_permille_of_rtn"] <= 1000


def test_option_errors_are_clear(stories_hf: Path, eval_ids: Path, tmp_path: Path) -> None:
    with pytest.raises(LlmcError, match="need --eval-file"):
        compile_model(stories_hf, tmp_path / "x", CompileOptions(quant="int4", max_ppl_increase="5%"))
    with pytest.raises(LlmcError, match="no tokenizer"):
        compile_model(stories_hf, tmp_path / "x", CompileOptions(quant="int4", eval_file=Path(__file__)))
    with pytest.raises(LlmcError, match="like 10%"):
        compile_model(stories_hf, tmp_path / "x", CompileOptions(quant="int4", eval_file=eval_ids,
                                                                 max_ppl_increase="ten"))


def test_cli_gate_exit_code_and_inspect(stories_hf: Path, eval_ids: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    res = runner.invoke(main, ["compile", str(stories_hf), "-o", str(tmp_path / "a"), "--quant", "int4",
                               "--eval-file", str(eval_ids), "--max-ppl-increase", "0.01%"])
    assert res.exit_code == 2 and "accuracy gate failed" in res.output
    assert not (tmp_path / "a").exists()
    res = runner.invoke(main, ["compile", str(stories_hf), "-o", str(tmp_path / "b"), "--quant", "int4",
                               "--group-size", "64", "--sym", "--quant-override", "layers.0.*=int8",
                               "--eval-file", str(eval_ids)])
    assert res.exit_code == 0, res.output
    assert "quality: ppl" in res.output
    res = runner.invoke(main, ["inspect", str(tmp_path / "b")])
    assert res.exit_code == 0 and "quality" in res.output and "int4g64s" in res.output
    params = Artifact.load(tmp_path / "b").manifest["quantization"]["params"]
    assert params["layers.0.down"].startswith("int8") and params["layers.1.down"] == "int4g64s"
