"""The tvm target cross-compiles for CUDA and ROCm here: every kernel has compiled device code.

No GPU is needed (nor used): the checks read the exported library's embedded device ELF
(a cubin inside the CUDA fatbin, an AMDGPU code object) and compare its function symbols with
the kernels TVM generated. Running these artifacts needs the GPU (CUDA) or a ROCm build of TVM.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest

# One TVM worker thread: TVM's spinning thread pool degrades badly on a loaded 2-core CI machine.
os.environ.setdefault("TVM_NUM_THREADS", "1")
pytest.importorskip("tvm", reason="apache-tvm is not installed (the tvm extra: pip install -e '.[tvm]')")

from llmc.errors import TargetUnavailableError, UnsupportedError
from llmc.runtime.registry import get_target
from llmc.targets.tvm.devcode import amdgpu_mach, cuda_sm, device_images
from tests.targets.tvm_util import random_weights, tiny_config, tiny_module, write_artifact

pytestmark = [pytest.mark.tvm, pytest.mark.slow]


def _tiny(tmp_path: Path, head_dim: int = 16, **options: object):
    config = tiny_config(num_layers=1, hidden_size=4 * head_dim, head_dim=head_dim)
    weights = random_weights(config, seed=1)
    return write_artifact(tiny_module(config, weights), weights, tmp_path / "art", **options)


def _check(art, machine: str) -> tuple[list[str], set[str], int]:
    payload = json.loads(art.file("target/tvm/tvm.json").read_text())
    kernels = payload["device_code"]["kernels"]
    images = device_images(art.file("target/tvm/model.so"))
    assert images and all(im.machine == machine for im in images)
    functions = {f for im in images for f in im.functions}
    assert len(kernels) >= 10
    assert any("attention" in k or "batch_decode" in k for k in kernels)
    assert any("matmul" in k for k in kernels)
    missing = [k for k in kernels if k not in functions]
    assert not missing, f"kernels without device code: {missing}"
    return kernels, functions, images[0].flags


def test_cuda_h100_fatbin_holds_every_kernel(tmp_path: Path) -> None:
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc (the CUDA toolkit) is not installed: cannot compile CUDA device code")
    try:
        art = _tiny(tmp_path, device="cuda", arch="nvidia/nvidia-h100")
    except TargetUnavailableError as exc:
        pytest.skip(f"CUDA toolchain unusable here: {exc}")
    _, _, flags = _check(art, "cuda")
    assert cuda_sm(flags) == 90
    assert art.manifest["target"]["options"]["device"] == "cuda"
    with pytest.raises(TargetUnavailableError):
        if not _has_cuda_gpu():
            get_target("tvm").load(art)
        else:  # pragma: no cover - a GPU machine runs it for real in the benchmarks
            raise TargetUnavailableError("skip")


def test_cuda_refuses_heads_too_small_for_tvm_decode_attention(tmp_path: Path) -> None:
    """head_dim 8 with 2 query heads per kv head: TVM's decode kernel would need 128 threads in z."""
    with pytest.raises(UnsupportedError, match=r"\(2, 2, 128\) threads for head_dim 8"):
        _tiny(tmp_path, head_dim=8, device="cuda", arch="nvidia/nvidia-h100")


def _has_cuda_gpu() -> bool:
    import tvm

    return tvm.get_global_func("device_api.cuda", allow_missing=True) is not None and tvm.cuda(0).exist


def test_rocm_gfx942_code_object_holds_every_kernel(tmp_path: Path) -> None:
    from llmc.targets.tvm.build import rocm_toolchain

    try:
        rocm_toolchain()
    except TargetUnavailableError as exc:
        pytest.skip(f"no ROCm toolchain (run scripts/setup_rocm_toolchain.sh): {exc}")
    art = _tiny(tmp_path, device="rocm", arch="gfx942")
    _, _, flags = _check(art, "amdgpu")
    assert amdgpu_mach(flags) == 0x4C  # EF_AMDGPU_MACH_AMDGCN_GFX942
    with pytest.raises(TargetUnavailableError, match="rocm"):
        get_target("tvm").load(art)
