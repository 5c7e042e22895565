"""Artifact round trip and corruption detection."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from llmc.compiler.frontends.source import load_source
from llmc.driver import CompileOptions, compile_model
from llmc.errors import ArtifactError
from llmc.runtime.artifact import MANIFEST, SCHEMA_VERSION, WEIGHTS_FILE, Artifact


@pytest.fixture(scope="module")
def artifact_dir(tiny_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return compile_model(tiny_hf, tmp_path_factory.mktemp("a") / "art", CompileOptions(opt_level=0))


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_round_trip(artifact_dir: Path, tiny_hf: Path) -> None:
    artifact = Artifact.load(artifact_dir)
    m = artifact.manifest
    assert m["schema_version"] == SCHEMA_VERSION and m["target"]["name"] == "torch"
    assert set(m["entries"]) == {"prefill", "decode"}
    assert m["source"]["files"]["config.json"]
    assert all(rec["sha256"] for rec in m["files"].values())
    source = load_source(tiny_hf)
    weights = artifact.weights()
    for name in ("embed", "layers.0.q", "layers.1.down", "lm_head"):
        np.testing.assert_array_equal(weights[name], source.weights[name])
    assert artifact.config == source.config
    assert not list(artifact_dir.parent.glob(".*tmp*")), "temporary directory left behind"


def test_changed_byte_is_detected(artifact_dir: Path, tmp_path: Path) -> None:
    art = _copy(artifact_dir, tmp_path)
    path = art / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        Artifact.load(art)


def test_truncated_and_missing_files(artifact_dir: Path, tmp_path: Path) -> None:
    art = _copy(artifact_dir, tmp_path)
    path = art / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(ArtifactError, match="truncated"):
        Artifact.load(art)
    path.unlink()
    with pytest.raises(ArtifactError, match="is missing"):
        Artifact.load(art)
    (art / MANIFEST).unlink()
    with pytest.raises(ArtifactError, match="not an llmc artifact"):
        Artifact.load(art)


def test_newer_schema_is_refused(artifact_dir: Path, tmp_path: Path) -> None:
    art = _copy(artifact_dir, tmp_path)
    manifest = json.loads((art / MANIFEST).read_text())
    manifest["schema_version"] = SCHEMA_VERSION + 1
    (art / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="newer than this llmc supports"):
        Artifact.load(art)


def test_failed_compile_leaves_nothing(tmp_path: Path) -> None:
    from llmc.errors import LlmcError

    out = tmp_path / "never"
    with pytest.raises(LlmcError):
        compile_model(tmp_path / "missing", out, CompileOptions())
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_recompile_replaces_atomically(artifact_dir: Path, tiny_hf: Path, tmp_path: Path) -> None:
    out = _copy(artifact_dir, tmp_path)
    compile_model(tiny_hf, out, CompileOptions(opt_level=0, dtype="float16"))
    assert Artifact.load(out).manifest["params"]["layers.0.q"]["dtype"] == "float16"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]
