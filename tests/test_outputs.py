"""`llmc compile -o` and `llmc synth -o` never lose a user's data (issue 19, items 1 and 8): they
replace only what llmc wrote, refuse anything else before any work, never touch the source, and
leave no temporary folder behind (SIGTERM included); stale ones of dead processes are swept."""

from __future__ import annotations

import hashlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.compiler.atomic_output import TERMINATED_EXIT


def _tree(path: Path) -> dict[str, str]:
    """Every file under ``path`` with its sha256 (what must not change)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


def _compile(source: Path, out: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["compile", str(source), "-o", str(out), "--opt-level", "0"])
    return result.exit_code, result.output


@pytest.fixture()
def source(tiny_hf: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny model inside ``tmp_path/models`` (the tests point -o at it and around it)."""
    return Path(shutil.copytree(tiny_hf, tmp_path / "models" / "hf"))


def test_compile_refuses_a_folder_with_user_files(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("important")
    before = _tree(out)
    code, output = _compile(source, out)
    assert code == 2 and "exists and is not an llmc artifact; refusing to replace this folder" in output
    assert "Traceback" not in output and _tree(out) == before


@pytest.mark.parametrize("where", ["source", "parent", "grandparent", "file"])
def test_compile_never_deletes_its_source(source: Path, tmp_path: Path, where: str) -> None:
    out = {"source": source, "parent": source.parent, "grandparent": tmp_path, "file": source / "config.json"}[where]
    before = _tree(tmp_path)
    code, output = _compile(source, out)
    expected = "refusing to replace this file" if where == "file" else "would replace the input"
    assert code == 2 and expected in output, output
    assert _tree(tmp_path) == before


def test_compile_refuses_a_plain_file(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "out.bin"
    out.write_bytes(b"user data")
    code, output = _compile(source, out)
    assert code == 2 and "refusing to replace this file" in output
    assert out.read_bytes() == b"user data"


def test_compile_refuses_to_overwrite_a_gguf_source(tiny_hf: Path, tmp_path: Path) -> None:
    from tests.compiler.gguf_util import hf_to_gguf

    gguf = hf_to_gguf(tiny_hf, tmp_path / "model.gguf")
    before = gguf.read_bytes()
    for out in (gguf, tmp_path):
        code, output = _compile(gguf, out)
        assert code == 2 and "would replace the input" in output
    assert gguf.read_bytes() == before


def test_compile_replaces_its_own_artifact_but_not_one_with_added_files(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    assert _compile(source, out)[0] == 0
    assert _compile(source, out)[0] == 0  # an artifact it wrote: replaced
    (out / "my_results.csv").write_text("1,2,3")
    code, output = _compile(source, out)
    assert code == 2 and "refusing" in output
    assert (out / "my_results.csv").read_text() == "1,2,3"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art", "models"]


def test_compile_into_an_empty_folder(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "empty"
    out.mkdir()
    assert _compile(source, out)[0] == 0 and (out / "manifest.json").exists()


def test_compile_sweeps_stale_temporary_folders(source: Path, tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    stale = tmp_path / f".art.tmp-{proc.pid}"  # what a SIGKILLed compile leaves
    (stale / "weights").mkdir(parents=True)
    (stale / "weights" / "model.safetensors").write_bytes(b"\0" * 4096)
    assert _compile(source, tmp_path / "art")[0] == 0
    assert not stale.exists()


SLOW_COMPILE = textwrap.dedent("""
    import sys, time
    from llmc.driver import CompileOptions, compile_model
    from llmc.targets.torch.target import TorchTarget

    emit = TorchTarget.emit
    def slow_emit(self, module, weights, writer, options):
        result = emit(self, module, weights, writer, options)
        print(writer.tmp, flush=True)
        time.sleep(60)
        return result
    TorchTarget.emit = slow_emit
    compile_model(sys.argv[1], sys.argv[2], CompileOptions(opt_level=0))
""")


def test_sigterm_mid_compile_leaves_nothing(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "art"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_COMPILE, str(source), str(out)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    tmp = Path(proc.stdout.readline().strip())
    assert (tmp / "weights" / "model.safetensors").exists()  # mid-compile: the weights are written
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == TERMINATED_EXIT
    time.sleep(0.1)
    assert not tmp.exists() and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["models"]


def test_synth_replaces_only_its_own_outputs(tmp_path: Path) -> None:
    runner = CliRunner()
    folder = tmp_path / "synth"
    for _ in range(2):  # its own folder is replaced
        result = runner.invoke(main, ["synth", "--preset", "tiny", "-o", str(folder)])
        assert result.exit_code == 0, result.output
    (folder / "extra.txt").write_text("mine")
    result = runner.invoke(main, ["synth", "--preset", "tiny", "-o", str(folder)])
    assert result.exit_code == 2 and "not a folder written by llmc synth" in result.output
    assert (folder / "extra.txt").read_text() == "mine"
    gguf = tmp_path / "tiny.gguf"
    for _ in range(2):
        result = runner.invoke(main, ["synth", "--preset", "tiny", "--format", "gguf", "-o", str(gguf)])
        assert result.exit_code == 0, result.output
    other = tmp_path / "real.gguf"
    other.write_bytes(b"GGUF" + b"\0" * 100)
    result = runner.invoke(main, ["synth", "--preset", "tiny", "--format", "gguf", "-o", str(other)])
    assert result.exit_code == 2 and "not a GGUF file written by llmc synth" in result.output
    assert other.read_bytes() == b"GGUF" + b"\0" * 100
    home = tmp_path / "home"
    home.mkdir()
    (home / "photo.jpg").write_bytes(b"jpg")
    result = runner.invoke(main, ["synth", "--preset", "tiny", "-o", str(home)])
    assert result.exit_code == 2 and (home / "photo.jpg").read_bytes() == b"jpg"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_synth_refuses_a_negative_seed(tmp_path: Path) -> None:
    result = CliRunner().invoke(main, ["synth", "--preset", "tiny", "--seed", "-1", "-o", str(tmp_path / "s")])
    assert result.exit_code == 2 and "-1" in result.output and "Traceback" not in result.output
