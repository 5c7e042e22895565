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


def _edit_manifest(art: Path, edit) -> None:  # type: ignore[no-untyped-def]
    manifest = json.loads((art / MANIFEST).read_text())
    manifest = edit(manifest)
    (art / MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize(("edit", "message"), [
    (lambda m: [], "must hold a JSON object"),
    (lambda m: "artifact", "must hold a JSON object"),
    (lambda m: {k: v for k, v in m.items() if k != "target"}, "missing key 'target'"),
    (lambda m: {**m, "target": {"options": {}}}, "missing key 'target.name'"),
    (lambda m: {**m, "target": {**m["target"], "name": 7}}, "target.name must be a string"),
    (lambda m: {**m, "params": []}, "params must be an object"),
    (lambda m: {**m, "model": {**m["model"], "hidden_size": "abc"}}, "model: .*hidden_size must be an integer"),
    (lambda m: {**m, "model": {**m["model"], "max_position": 2**40}}, "max_position .* must be in"),
    (lambda m: {**m, "params": {**m["params"], "embed": {"shape": "x"}}}, "params.embed.shape"),
    (lambda m: {**m, "files": {"../../outside": {"bytes": 1, "sha256": "0" * 64}}}, "not a path inside"),
    (lambda m: {**m, "files": {"/etc/passwd": {"bytes": 1, "sha256": "0" * 64}}}, "not a path inside"),
    (lambda m: {**m, "schema_version": True}, "schema_version must be a positive integer"),
    (lambda m: {**m, "pipeline": {"opt_level": 0, "passes": [{"name": "dce"}]}}, "missing key 'pipeline.passes"),
])
def test_malformed_manifest_is_a_clear_error(artifact_dir: Path, tmp_path: Path, edit, message: str) -> None:  # type: ignore[no-untyped-def]
    art = _copy(artifact_dir, tmp_path)
    _edit_manifest(art, edit)
    for verify in (True, False):  # the structure is checked even without checksums
        with pytest.raises(ArtifactError, match=message):
            Artifact.load(art, verify=verify)


def test_an_emptied_file_list_does_not_turn_off_verification(artifact_dir: Path, tmp_path: Path) -> None:
    art = _copy(artifact_dir, tmp_path)
    path = art / WEIGHTS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a flipped weight byte...
    path.write_bytes(bytes(data))
    _edit_manifest(art, lambda m: {**m, "files": {}})  # ...hidden by an emptied file list
    with pytest.raises(ArtifactError, match=r"does not list ir/final\.ir"):
        Artifact.load(art)
    original = json.loads((artifact_dir / MANIFEST).read_text())["files"]
    _edit_manifest(art, lambda m: {**m, "files": {k: v for k, v in original.items() if k != WEIGHTS_FILE}})
    with pytest.raises(ArtifactError, match=r"does not list weights/model\.safetensors"):
        Artifact.load(art)
    _edit_manifest(art, lambda m: {**m, "files": original})
    with pytest.raises(ArtifactError, match="sha256 does not match"):
        Artifact.load(art)


def test_every_file_must_be_listed_and_stay_inside(artifact_dir: Path, tmp_path: Path) -> None:
    from llmc.runtime.artifact import is_artifact_dir

    art = _copy(artifact_dir, tmp_path)
    assert is_artifact_dir(art)
    (art / "target" / "extra.bin").write_bytes(b"unverified")
    with pytest.raises(ArtifactError, match=r"target/extra\.bin is not listed in the manifest"):
        Artifact.load(art)
    assert not is_artifact_dir(art)  # a compile will not replace it either
    (art / "target" / "extra.bin").unlink()
    outside = tmp_path / "outside.safetensors"
    shutil.copy(art / WEIGHTS_FILE, outside)
    (art / WEIGHTS_FILE).unlink()
    (art / WEIGHTS_FILE).symlink_to(outside)  # same bytes, but not inside the artifact
    with pytest.raises(ArtifactError, match="symbolic link"):
        Artifact.load(art)


def test_cli_reports_a_bad_manifest_in_one_line(artifact_dir: Path, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from llmc.cli import main

    art = _copy(artifact_dir, tmp_path)
    _edit_manifest(art, lambda m: {k: v for k, v in m.items() if k != "target"})
    for args in (["run", str(art), "--prompt-ids", "1"], ["inspect", str(art)], ["tokenize", str(art), "--text", "a"]):
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 2, (args, result.output)
        assert result.output.startswith("error: ") and "missing key 'target'" in result.output
        assert "Traceback" not in result.output
