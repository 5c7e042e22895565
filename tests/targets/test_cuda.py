"""Targets on a CUDA GPU (marked ``gpu``; skipped without one): the torch target against the
stories260k golden ids and itself on the CPU; the tvm target against the torch target on the GPU.

TVM's CUDA decode-attention kernel cannot take stories260k's head_dim 8 (refused at compile time),
so the tvm checks use ``CUDA_TINY`` (head_dim 64). Its artifacts are compiled here when the full
apache-tvm wheel is installed; a GPU host with only TVM's runtime gets them from
``LLMC_PREBUILT_TVM_CUDA``: a folder with ``tiny-hf``, ``tiny`` and ``tiny-int4`` made by
benchmarks/gpu/prepare.sh.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from llmc.driver import CompileOptions, compile_model
from llmc.runtime.artifact import Artifact, sha256_file
from llmc.runtime.generate import generate_ids
from llmc.runtime.loader import load_model
from llmc.runtime.sampling import SamplingParams
from tests.helpers import RAGGED_STEPS, SequenceDriver
from tests.models import CUDA_TINY, write_random_hf_model

torch = pytest.importorskip("torch")

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda() -> str:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU here (torch.cuda.is_available() is False)")
    return "cuda"


def _compile(source: Path, out: Path, **options: object) -> Path:
    return compile_model(source, out, CompileOptions(**options))  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def torch_cuda_artifacts(cuda: str, stories_hf: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("torch-cuda")
    return {
        "fp32": _compile(stories_hf, root / "fp32", target="torch", device=cuda),
        "int4": _compile(stories_hf, root / "int4", target="torch", device=cuda, quant="int4"),
        "int4-cpu": _compile(stories_hf, root / "int4-cpu", target="torch", quant="int4"),
    }


@pytest.fixture(scope="module")
def tvm_cuda_artifacts(cuda: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """fp32 and int4 tvm cuda artifacts of the CUDA_TINY model, and its HF folder (``hf``)."""
    prebuilt = os.environ.get("LLMC_PREBUILT_TVM_CUDA")
    if prebuilt:
        out = {"hf": Path(prebuilt) / "tiny-hf", "fp32": Path(prebuilt) / "tiny", "int4": Path(prebuilt) / "tiny-int4"}
        for key in ("fp32", "int4"):
            source = Artifact.load(out[key], verify=False).manifest["source"]["files"]
            here = {p.name: sha256_file(p) for p in out["hf"].iterdir() if p.name in source}
            if here != source:
                pytest.fail(f"{out[key]} was not compiled from {out['hf']} (source checksums differ)")
        return out
    if importlib.util.find_spec("tvm") is None:
        pytest.skip("apache-tvm is not installed and LLMC_PREBUILT_TVM_CUDA names no prebuilt artifacts")
    import tvm

    if "tvm_compiler" not in tvm.base._LOADED_LIBS:
        pytest.skip("this TVM is runtime-only (no compiler) and LLMC_PREBUILT_TVM_CUDA is unset")
    root = tmp_path_factory.mktemp("tvm-cuda")
    hf = write_random_hf_model(root / "tiny-hf", **CUDA_TINY)
    major, minor = torch.cuda.get_device_capability()
    arch = f"sm_{major}{minor}{'a' if major >= 9 else ''}"
    options = {"target": "tvm", "device": "cuda", "target_options": {"arch": arch}}
    return {"hf": hf, "fp32": _compile(hf, root / "tiny", **options),
            "int4": _compile(hf, root / "tiny-int4", quant="int4", **options)}


@pytest.fixture(scope="module")
def torch_cuda_tiny(tvm_cuda_artifacts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root, hf = tmp_path_factory.mktemp("torch-cuda-tiny"), tvm_cuda_artifacts["hf"]
    return {"fp32": _compile(hf, root / "fp32", target="torch", device="cuda"),
            "int4": _compile(hf, root / "int4", target="torch", device="cuda", quant="int4")}


def _greedy(path: Path, n: int = 200) -> list[int]:
    model = load_model(str(path))
    return generate_ids(model, [1], SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)).token_ids


def _assert_same_logits(got_path: Path, want_path: Path, atol: float) -> None:
    from llmc.runtime.registry import get_target

    artifacts = [Artifact.load(p) for p in (got_path, want_path)]
    drivers = [SequenceDriver(get_target(a.target).load(a)) for a in artifacts]
    for i, chunks in enumerate(RAGGED_STEPS):
        all_rows = i != 2
        got, want = (d.step(chunks, all_rows=all_rows) for d in drivers)
        for g, w in zip(got, want, strict=True):
            assert g.dtype == np.float32 and np.isfinite(g).all()
            np.testing.assert_allclose(g, w, atol=atol, rtol=0, err_msg=f"step {i}")


def test_torch_cuda_greedy_200_exact(torch_cuda_artifacts: dict[str, Path], stories_expected_ids: list[int]) -> None:
    assert load_model(str(torch_cuda_artifacts["fp32"])).executor.device.startswith("cuda")
    assert _greedy(torch_cuda_artifacts["fp32"]) == stories_expected_ids


def test_torch_cuda_matches_cpu_on_ragged_batches(torch_cuda_artifacts: dict[str, Path],
                                                  stories_artifact: Path) -> None:
    _assert_same_logits(torch_cuda_artifacts["fp32"], stories_artifact, atol=1e-4)


def test_torch_cuda_int4_matches_cpu(torch_cuda_artifacts: dict[str, Path]) -> None:
    """The same int4 codes dequantized on the GPU and in the CPU kernel give the same logits."""
    _assert_same_logits(torch_cuda_artifacts["int4"], torch_cuda_artifacts["int4-cpu"], atol=2e-4)


def test_tvm_cuda_greedy_matches_torch_cuda(tvm_cuda_artifacts: dict[str, Path],
                                            torch_cuda_tiny: dict[str, Path]) -> None:
    manifest = Artifact.load(tvm_cuda_artifacts["fp32"]).manifest
    assert manifest["target"]["options"]["device"] == "cuda"
    assert load_model(str(tvm_cuda_artifacts["fp32"])).executor.device == "cuda"
    assert _greedy(tvm_cuda_artifacts["fp32"], 64) == _greedy(torch_cuda_tiny["fp32"], 64)


def test_tvm_cuda_matches_torch_cuda_on_ragged_batches(tvm_cuda_artifacts: dict[str, Path],
                                                       torch_cuda_tiny: dict[str, Path]) -> None:
    _assert_same_logits(tvm_cuda_artifacts["fp32"], torch_cuda_tiny["fp32"], atol=1e-4)


def test_tvm_cuda_int4_matches_torch_cuda(tvm_cuda_artifacts: dict[str, Path],
                                          torch_cuda_tiny: dict[str, Path]) -> None:
    """TVM's fused dequant-matmul kernels against torch's dequantize-then-matmul on the same codes."""
    _assert_same_logits(tvm_cuda_artifacts["int4"], torch_cuda_tiny["int4"], atol=2e-4)
