"""Writing an output (a folder or a file) so that nothing a user had is lost.

:class:`AtomicOutput` writes into a temporary sibling (``.NAME.tmp-PID``) and renames it into
place only when complete. It never replaces what it did not write: an existing output is
replaced only when the caller's ``replaceable`` test says it is llmc's own (an artifact, a
synthetic model), else the write is refused before any work; an output that is, or holds, one
of the inputs is refused too. A SIGTERM during the write removes the temporary sibling (the
process then exits with status 143), and temporary siblings left by processes that died
(SIGKILL, power loss) are swept by the next write to the same output.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import threading
from collections.abc import Callable, Iterable
from pathlib import Path
from types import FrameType

from llmc.compiler.errors import InputError

TERMINATED_EXIT = 128 + signal.SIGTERM


def _alive(pid: int) -> bool:
    """Whether process ``pid`` exists (one of another user counts as alive)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return True
    return True


def remove_path(path: Path) -> None:
    """Remove a file, a link or a folder tree (nothing when absent)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def stale_siblings(out: Path) -> list[Path]:
    """Temporary siblings of ``out`` (``.NAME.tmp-PID``, ``.NAME.old-PID``) whose process is gone."""
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)$")
    try:
        entries = list(out.parent.iterdir())
    except OSError:
        return []
    stale = []
    for entry in entries:
        match = pattern.match(entry.name)
        if match and int(match.group(1)) != os.getpid() and not _alive(int(match.group(1))):
            stale.append(entry)
    return stale


def _contains(outer: Path, inner: Path) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it (both resolved)."""
    return inner == outer or outer in inner.parents


def check_output(out: Path, inputs: Iterable[Path], replaceable: Callable[[Path], bool], what: str) -> None:
    """Refuse ``out`` when it is or holds one of ``inputs``, or exists and is not llmc's own
    (``replaceable``); an empty folder may be replaced. ``what`` names the output in messages."""
    resolved = out.resolve()
    for source in inputs:
        if _contains(resolved, Path(source).resolve()):
            raise InputError(f"{out}: the output would replace the input {source}; choose another output path")
    if not (out.exists() or out.is_symlink()):
        return
    if out.is_symlink():
        raise InputError(f"{out}: exists and is a symbolic link; refusing to replace it (choose another output path)")
    if out.is_dir() and not any(out.iterdir()):
        return
    if not replaceable(out):
        kind = "folder" if out.is_dir() else "file"
        raise InputError(f"{out}: exists and is not {what}; refusing to replace this {kind} "
                         "(choose another output path, or remove it yourself)")


class AtomicOutput:
    """A temporary sibling of ``out`` to write into, renamed into place by :meth:`commit`.

    Use as a context manager: ``__enter__`` checks ``out`` (:func:`check_output`), sweeps stale
    temporary siblings and returns the temporary path (a folder is created when ``folder``);
    leaving the block without :meth:`commit` (an exception, a SIGTERM) removes that path.
    """

    def __init__(self, out: str | Path, *, replaceable: Callable[[Path], bool], what: str,
                 inputs: Iterable[Path] = (), folder: bool = True) -> None:
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.replaceable = replaceable
        self.what = what
        self.inputs = [Path(p) for p in inputs]
        self.folder = folder
        self._previous_handler: object = None
        self._handler_installed = False

    def __enter__(self) -> Path:
        check_output(self.out, self.inputs, self.replaceable, self.what)
        for stale in stale_siblings(self.out):
            remove_path(stale)
        remove_path(self.tmp)
        self.tmp.parent.mkdir(parents=True, exist_ok=True)
        self._install_sigterm()
        if self.folder:
            self.tmp.mkdir()
        return self.tmp

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        try:
            remove_path(self.tmp)  # nothing left after commit(); a half-written output otherwise
        finally:
            self._restore_sigterm()

    def commit(self) -> Path:
        """Move the finished temporary path into place (replacing llmc's own earlier output)."""
        check_output(self.out, self.inputs, self.replaceable, self.what)  # it may have changed meanwhile
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            remove_path(old)
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            remove_path(old)
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, self.out)
        return self.out

    # SIGTERM: by default Python dies without running cleanup; turn it into SystemExit(143) so the
    # ``with`` blocks remove the temporary path (only where nobody else handles SIGTERM).
    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
                self._previous_handler = signal.signal(signal.SIGTERM, _terminate)
                self._handler_installed = True

    def _restore_sigterm(self) -> None:
        if self._handler_installed:
            with contextlib.suppress(ValueError, OSError):
                signal.signal(signal.SIGTERM, self._previous_handler)  # type: ignore[arg-type]
            self._handler_installed = False


def _terminate(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(TERMINATED_EXIT)
