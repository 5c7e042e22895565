"""``serve`` and ``eval`` take a GGUF file or a Hugging Face folder as ``run`` does."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import main


def test_eval_a_gguf_against_a_folder(stories_gguf: Path, stories_hf: Path, stories_expected_ids: list[int],
                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LLMC_ARTIFACTS", str(tmp_path / "cache"))
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([1, *stories_expected_ids[:60]]))
    result = CliRunner().invoke(main, ["eval", str(stories_gguf), "--ids-file", str(ids), "--reference",
                                       str(stories_hf)])
    assert result.exit_code == 0, result.output
    values = {k.strip(): v for k, v in (line.split(": ") for line in result.stdout.splitlines())}
    assert values["tokens"].strip() == "60"
    assert 1.0 < float(values["perplexity"]) < 3.0 and len(values["perplexity"].split(".")[1]) == 4
    assert float(values["kl_mean"]) < 1e-3 and values["top1_agreement"].endswith("%")  # the same weights
    names = sorted(p.name for p in (tmp_path / "cache").iterdir() if not p.name.startswith("."))
    assert [n.rsplit("-", 1)[0] for n in names] == ["hf-none-torch", "stories260k-f32-native-torch"]


def test_serve_a_gguf(stories_gguf: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")
    import httpx

    from tests.runtime.serving import ServerProcess

    monkeypatch.setenv("LLMC_ARTIFACTS", str(tmp_path / "cache"))
    with ServerProcess(stories_gguf, log=tmp_path / "server.log") as server:
        models = httpx.get(f"{server.url}/v1/models", timeout=10).json()
        assert [m["id"] for m in models["data"]] == ["stories260k-f32"]  # the file's stem, not the cache entry
        reply = httpx.post(f"{server.url}/v1/completions", timeout=60, json={
            "model": "stories260k-f32", "prompt": "Once upon a time", "max_tokens": 5, "temperature": 0}).json()
        assert reply["choices"][0]["text"]
    assert "compiling" in (tmp_path / "server.log").read_text()
