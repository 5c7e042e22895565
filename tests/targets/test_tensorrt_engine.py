"""TensorRT engines: the version/GPU refusal (pure, runs everywhere) and the real build and run
(``gpu`` + ``tensorrt``: skipped unless the tensorrt package and a CUDA GPU are present)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("onnx", reason="onnx is not installed (pip install 'llmc-toolchain[onnx]')")
pytest.importorskip("onnxruntime", reason="onnxruntime is not installed (pip install 'llmc-toolchain[onnx]')")

from llmc.driver import CompileOptions, compile_model
from llmc.errors import TargetUnavailableError
from llmc.runtime.artifact import MANIFEST, Artifact
from llmc.runtime.generate import generate_ids
from llmc.runtime.loader import load_model
from llmc.runtime.registry import get_target
from llmc.runtime.sampling import SamplingParams
from llmc.targets.tensorrt.engine import check_engine_compat, tensorrt_missing
from tests.targets.onnx_util import drive
from tests.targets.test_tensorrt_target import SCHEDULE

BUILT = {"built": True, "file": "model.engine", "tensorrt_version": "10.15.1.29", "compute_capability": "9.0",
         "gpu_name": "NVIDIA H100 80GB HBM3"}


def test_compat_check_accepts_the_same_version_and_gpu() -> None:
    check_engine_compat(BUILT, {"tensorrt_version": "10.15.1.29", "compute_capability": "9.0",
                                "gpu_name": "NVIDIA H100 PCIe"})  # another board of the same architecture


def test_compat_check_refuses_another_tensorrt_version() -> None:
    here = {"tensorrt_version": "10.13.0.35", "compute_capability": "9.0", "gpu_name": "NVIDIA H100"}
    with pytest.raises(TargetUnavailableError, match=r"built with TensorRT 10\.15\.1\.29.*has TensorRT 10\.13\.0\.35"):
        check_engine_compat(BUILT, here)


def test_compat_check_refuses_another_gpu() -> None:
    here = {"tensorrt_version": "10.15.1.29", "compute_capability": "8.9", "gpu_name": "NVIDIA L4"}
    with pytest.raises(TargetUnavailableError, match=r"compute capability 9\.0.*this GPU is 8\.9 \(NVIDIA L4\)") as err:
        check_engine_compat(BUILT, here)
    assert "llmc compile" in str(err.value) and "cpu-ort" in str(err.value)  # says how to get a usable artifact


@pytest.fixture(scope="module")
def doctored(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TensorRT artifact whose manifest claims an engine built with TensorRT 10.15 on an H100."""
    path = compile_model(stories_hf, tmp_path_factory.mktemp("doctored") / "art", CompileOptions(target="tensorrt"))
    manifest = json.loads((path / MANIFEST).read_text())
    manifest["target"]["options"]["engine"] = BUILT
    (path / MANIFEST).write_text(json.dumps(manifest))
    return path


def test_load_refuses_a_doctored_manifest_before_touching_the_engine(doctored: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The loader runs the compat check on the manifest's record vs this machine before deserializing."""
    import llmc.targets.tensorrt.engine as engine

    monkeypatch.setattr(engine, "tensorrt_missing", lambda: None)
    monkeypatch.setattr(engine, "runtime_info", lambda index=0: {
        "tensorrt_version": "10.15.1.29", "compute_capability": "8.6", "gpu_name": "NVIDIA RTX A6000"})
    with pytest.raises(TargetUnavailableError, match=r"compute capability 9\.0"):
        load_model(str(doctored), device="cuda:0")
    monkeypatch.setattr(engine, "runtime_info", lambda index=0: {
        "tensorrt_version": "11.0.0.1", "compute_capability": "9.0", "gpu_name": "NVIDIA H100"})
    with pytest.raises(TargetUnavailableError, match=r"built with TensorRT 10\.15\.1\.29"):
        load_model(str(doctored), device="cuda:0")


def test_load_without_tensorrt_names_the_missing_package(doctored: Path) -> None:
    if tensorrt_missing() is None:
        pytest.skip("tensorrt is installed here")
    with pytest.raises(TargetUnavailableError, match="tensorrt Python package is not importable"):
        load_model(str(doctored), device="cuda")


def _require_tensorrt_gpu() -> None:
    pytest.importorskip("tensorrt",
                        reason="TensorRT is not installed (pip install 'llmc-toolchain[tensorrt]', NVIDIA's index)")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("TensorRT engines need a CUDA GPU; none is visible")


@pytest.fixture(scope="module")
def engine_artifact(stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    _require_tensorrt_gpu()
    return compile_model(stories_hf, tmp_path_factory.mktemp("engine") / "art",
                         CompileOptions(target="tensorrt", device="cuda"))


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_built_and_recorded(engine_artifact: Path) -> None:
    from llmc.targets.tensorrt.engine import runtime_info

    engine = Artifact.load(engine_artifact).target_options["engine"]
    assert engine["built"] is True and (engine_artifact / "target" / "model.engine").stat().st_size > 0
    here = runtime_info(0)
    assert engine["tensorrt_version"] == here["tensorrt_version"]
    assert engine["compute_capability"] == here["compute_capability"]


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_engine_logits_match_onnxruntime_and_greedy(engine_artifact: Path, stories_expected_ids: list[int]) -> None:
    artifact = Artifact.load(engine_artifact)
    target = get_target("tensorrt")
    got = drive(target.load(artifact, device="cuda"), SCHEDULE)
    want = drive(target.load(artifact, device="cpu-ort"), SCHEDULE)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        np.testing.assert_allclose(g, w, atol=1e-3, rtol=0, err_msg=f"step {i}")
    result = generate_ids(load_model(str(engine_artifact), device="cuda"), [1],
                          SamplingParams(max_tokens=200, temperature=0.0))
    assert result.token_ids == stories_expected_ids


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_int4_engine_builds_and_matches_onnxruntime(stories_hf: Path, tmp_path: Path) -> None:
    _require_tensorrt_gpu()
    path = compile_model(stories_hf, tmp_path / "int4", CompileOptions(target="tensorrt", device="cuda",
                                                                       quant="int4", sym=True))
    artifact = Artifact.load(path)
    target = get_target("tensorrt")
    got = drive(target.load(artifact, device="cuda"), SCHEDULE)
    want = drive(target.load(artifact, device="cpu-ort"), SCHEDULE)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, w, atol=1e-2, rtol=0)


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_real_engine_with_doctored_version_is_refused(engine_artifact: Path, tmp_path: Path) -> None:
    copy = tmp_path / "art"
    shutil.copytree(engine_artifact, copy)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["target"]["options"]["engine"]["tensorrt_version"] = "1.0.0"
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(TargetUnavailableError, match=r"built with TensorRT 1\.0\.0"):
        load_model(str(copy), device="cuda")
