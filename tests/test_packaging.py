"""The llmc namespace works from a normal (non-editable) install, and every package is listed."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11's tomllib")

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"llmc": "llmc", "compiler": "llmc.compiler", "passes": "llmc.passes", "targets": "llmc.targets",
           "runtime": "llmc.runtime"}


def _declared_packages() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return set(data["tool"]["setuptools"]["packages"])


def test_every_package_folder_is_declared() -> None:
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            relative = init.parent.relative_to(ROOT / folder)
            found.add(".".join([package, *relative.parts]))
    assert found == _declared_packages()


def test_wheel_install_imports_the_namespace(tmp_path: Path) -> None:
    wheel_dir = tmp_path / "wheel"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheel_dir), str(ROOT)],
                   check=True, timeout=600, cwd=tmp_path)
    (wheel,) = wheel_dir.glob("llmc_toolchain-*.whl")
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel) as zf:
        names = set(zf.namelist())
        zf.extractall(site)
    assert "llmc/compiler/ir/interp.py" in names
    assert all(f"llmc/targets/torch/csrc/{n}" in names for n in ("qk_binding.cpp", "qk_common.h"))
    assert not any(n.startswith(("compiler/", "passes/", "targets/", "runtime/")) for n in names)
    code = (
        "import llmc.compiler.ir, llmc.passes.manager, llmc.targets.torch.executor, llmc.runtime.engine, llmc.cli;"
        "print(llmc.compiler.ir.__file__)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env={"PYTHONPATH": str(site), "PATH": "/usr/bin:/bin"}, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().startswith(str(site))
