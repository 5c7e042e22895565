"""Perplexity, KL and top-1 agreement (runtime/evaluate.py) and ``llmc eval``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.driver import CompileOptions, compile_model
from llmc.errors import RequestError
from llmc.runtime.evaluate import evaluate, log_softmax, reference_logits, scored_logits
from llmc.runtime.loader import load_model


@pytest.fixture(scope="module")
def tiny_artifacts(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    base = tmp_path_factory.mktemp("ev")
    return (compile_model(tiny_hf, base / "fp32", CompileOptions()),
            compile_model(tiny_hf, base / "int4", CompileOptions(quant="int4")))


def _ids(n: int = 300, vocab: int = 128) -> list[int]:
    return [int(i) for i in np.random.default_rng(0).integers(0, vocab, size=n)]


def test_sliding_window_scores_every_token_once(tiny_artifacts: tuple[Path, Path]) -> None:
    ex = load_model(str(tiny_artifacts[0])).executor
    ids = _ids(300)  # the context is 128: several windows
    positions = [p for p, _ in scored_logits(ex, ids, window=64)]
    assert positions == list(range(1, 300))
    full = dict(scored_logits(ex, ids[:60]))
    windowed = dict(scored_logits(ex, ids[:60], window=64))
    for p in full:  # inside one window the sliding scorer is the plain forward
        np.testing.assert_allclose(windowed[p], full[p], rtol=0, atol=1e-4)


def test_metrics_match_a_direct_computation(tiny_artifacts: tuple[Path, Path]) -> None:
    fp32 = load_model(str(tiny_artifacts[0])).executor
    int4 = load_model(str(tiny_artifacts[1])).executor
    ids = _ids(100)
    ref = reference_logits(fp32, ids)
    got = list(scored_logits(int4, ids))
    nll = [-log_softmax(x)[ids[p]] for p, x in got]
    kl = [float(np.sum(np.exp(log_softmax(r)) * (log_softmax(r) - log_softmax(x)))) for (_, r), (_, x) in
          zip(ref, got, strict=True)]
    top1 = np.mean([np.argmax(r) == np.argmax(x) for (_, r), (_, x) in zip(ref, got, strict=True)])
    result = evaluate(int4, ids, reference=fp32)
    assert result.tokens == 99
    assert result.mean_nll == pytest.approx(float(np.mean(nll)), rel=1e-6)
    assert result.perplexity == pytest.approx(float(np.exp(np.mean(nll))), rel=1e-6)
    assert result.kl_mean == pytest.approx(float(np.mean(kl)), rel=1e-5) and result.kl_mean > 0
    assert result.top1_agreement == pytest.approx(float(top1))
    cached = evaluate(int4, ids, reference=ref)
    assert cached.kl_mean == pytest.approx(result.kl_mean, rel=1e-6)
    same = evaluate(fp32, ids, reference=ref)
    assert same.kl_mean == pytest.approx(0.0, abs=1e-9) and same.top1_agreement == 1.0


def test_mismatched_reference_and_bad_ids_are_errors(tiny_artifacts: tuple[Path, Path]) -> None:
    ex = load_model(str(tiny_artifacts[0])).executor
    ids = _ids(50)
    with pytest.raises(RequestError, match="same tokens"):
        evaluate(ex, ids, reference=reference_logits(ex, ids[:30]))
    with pytest.raises(RequestError, match="outside the vocabulary"):
        evaluate(ex, [1, 5, 999])


def test_cli_eval_with_reference(tiny_artifacts: tuple[Path, Path], tmp_path: Path) -> None:
    ids_file = tmp_path / "ids.json"
    ids_file.write_text(json.dumps(_ids(80)))
    res = CliRunner().invoke(main, ["eval", str(tiny_artifacts[1]), "--ids-file", str(ids_file), "--reference",
                                    str(tiny_artifacts[0]), "--json"])
    assert res.exit_code == 0, res.output
    data = json.loads(res.output)
    assert data["tokens"] == 79 and data["kl_mean"] > 0 and 0 < data["top1_agreement"] <= 1
    res = CliRunner().invoke(main, ["eval", str(tiny_artifacts[1]), "--text-file", str(ids_file)])
    assert res.exit_code == 2 and "tokenizer" in res.output
