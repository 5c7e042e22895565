"""The artifact cache: one build per source and options, reused; checksums remembered; two
processes at once compile once."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmc import artifact_cache
from llmc.artifact_cache import cached_artifacts, default_options, remove_cached, resolve_model, source_kind
from llmc.compiler.errors import LlmcError


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LLMC_ARTIFACTS", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_sources_are_compiled_once_and_reused(tiny_hf: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = resolve_model(tiny_hf)
    assert first.parent == cache and source_kind(first) == "artifact"
    assert resolve_model(first) == first  # an artifact is itself
    monkeypatch.setattr(artifact_cache, "compile_model", lambda *a, **k: pytest.fail("compiled again"))
    monkeypatch.setattr(artifact_cache, "sha256_file", lambda *a, **k: pytest.fail("hashed again"))
    assert resolve_model(tiny_hf) == first  # hit: no compile, no rehash (the checksum is remembered)
    (entry,) = cached_artifacts()
    assert entry.path == first and entry.quant == "none" and entry.target == "torch" and entry.bytes > 0


def test_changed_source_or_options_make_another_build(tiny_hf: Path, tmp_path: Path, cache: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(tiny_hf, copy)
    a = resolve_model(copy)
    b = resolve_model(copy, default_options(copy, quant="int8"))
    config = copy / "config.json"
    config.write_text(config.read_text() + "\n")  # other bytes: another checksum
    c = resolve_model(copy)
    assert len({a, b, c}) == 3
    assert remove_cached([b.name]) == [b.name] and not b.exists()
    with pytest.raises(LlmcError, match="not in the artifact cache"):
        remove_cached(["nope"])
    remove_cached(None)
    assert not cache.exists()


def test_gguf_defaults_to_its_own_quant_blocks(stories_gguf: Path, stories_hf: Path) -> None:
    assert default_options(stories_gguf).quant == "native"
    assert default_options(stories_hf).quant == "none"
    assert default_options(stories_gguf, quant="int4").quant == "int4"


def test_two_processes_at_once_compile_once(tiny_hf: Path, cache: Path) -> None:
    cmd = [sys.executable, "-m", "llmc.cli", "run", str(tiny_hf), "--prompt-ids", "1 2", "--max-tokens", "2",
           "--temperature", "0"]
    env = {**os.environ, "LLMC_ARTIFACTS": str(cache)}
    procs = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert results[0][0] == results[1][0]
    assert sum("later runs reuse it" in err for _, err in results) == 1  # one compiled, the other reused
    assert len(cached_artifacts()) == 1
    assert not [p for p in cache.iterdir() if ".tmp-" in p.name]
