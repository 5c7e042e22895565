"""Outputs are written atomically and never replace what llmc did not write (issue 19, items 1 and 8)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from llmc.compiler.atomic_output import TERMINATED_EXIT, AtomicOutput, check_output, stale_siblings
from llmc.errors import InputError


def _never(path: Path) -> bool:
    return False


def _always(path: Path) -> bool:
    return True


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_folder_of_someone_else_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    with (pytest.raises(InputError, match=r"exists and is not an artifact; refusing to replace this folder"),
          AtomicOutput(out, replaceable=_never, what="an artifact")):
        pass
    assert (out / "thesis.tex").read_text() == "years of work"
    assert not list(tmp_path.glob(".out.*"))


def test_a_plain_file_is_refused_and_kept(tmp_path: Path) -> None:
    out = tmp_path / "notes.txt"
    out.write_text("keep me")
    with pytest.raises(InputError, match="refusing to replace this file"):
        check_output(out, [], _never, "an artifact")
    assert out.read_text() == "keep me"


def test_an_output_that_is_or_holds_an_input_is_refused(tmp_path: Path) -> None:
    source = tmp_path / "models" / "hf"
    source.mkdir(parents=True)
    for out in (source, source.parent, tmp_path):
        with pytest.raises(InputError, match="would replace the input"):
            check_output(out, [source], _always, "an artifact")  # even if it looked replaceable
    check_output(source / "art", [source], _never, "an artifact")  # a new folder inside the source is fine


def test_empty_folder_and_own_output_are_replaced(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    for content in ("first", "second"):
        output = AtomicOutput(out, replaceable=lambda p: (p / "mark").exists(), what="ours")
        with output as tmp:
            (tmp / "mark").write_text(content)
            assert output.commit() == out
        assert (out / "mark").read_text() == content
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_leaving_without_commit_keeps_the_old_output(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "mark").write_text("old")
    with AtomicOutput(out, replaceable=_always, what="ours") as tmp:
        (tmp / "mark").write_text("new")
    assert (out / "mark").read_text() == "old" and not tmp.exists()


def test_failure_inside_removes_the_temporary_folder(tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), AtomicOutput(out, replaceable=_never, what="x") as tmp:
        (tmp / "half").write_text("written")
        raise RuntimeError("boom")
    assert not tmp.exists() and not out.exists()


def test_stale_temporary_folders_of_dead_processes_are_swept(tmp_path: Path) -> None:
    out = tmp_path / "art"
    dead = tmp_path / f".art.tmp-{_dead_pid()}"
    old = tmp_path / f".art.old-{_dead_pid()}"
    alive = tmp_path / f".art.tmp-{os.getppid()}"  # a running process (our parent) may still be writing
    other = tmp_path / f".other.tmp-{_dead_pid()}"  # another output's: not ours to sweep
    for p in (dead, old, alive, other):
        p.mkdir()
        (p / "weights").write_bytes(b"x" * 100)
    assert set(stale_siblings(out)) == {dead, old}
    output = AtomicOutput(out, replaceable=_never, what="x")
    with output:
        output.commit()
    assert not dead.exists() and not old.exists() and alive.exists() and other.exists()


SIGTERM_SCRIPT = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from llmc.compiler.atomic_output import AtomicOutput

    with AtomicOutput(Path(sys.argv[1]), replaceable=lambda p: False, what="x") as tmp:
        (tmp / "big").write_bytes(b"x" * 1000)
        print(tmp, flush=True)
        time.sleep(60)
""")


def test_sigterm_removes_the_temporary_folder(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-c", SIGTERM_SCRIPT, str(tmp_path / "out")], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout is not None
    tmp = Path(proc.stdout.readline().strip())
    assert tmp.is_dir()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == TERMINATED_EXIT
    assert not tmp.exists() and not (tmp_path / "out").exists()


def test_an_existing_sigterm_handler_is_left_alone(tmp_path: Path) -> None:
    seen: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: seen.append(s))
    try:
        with AtomicOutput(tmp_path / "out", replaceable=_never, what="x"):
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
        assert seen == [signal.SIGTERM]
    finally:
        signal.signal(signal.SIGTERM, previous)
