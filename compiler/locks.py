"""An inter-process lock on a file, for caches that two llmc processes may fill at once."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from llmc.compiler.progress import message

try:
    import fcntl
except ImportError:  # pragma: no cover  (Windows: no advisory locks; writes stay atomic renames)
    fcntl = None  # type: ignore[assignment]


@contextmanager
def file_lock(path: str | Path, waiting: str | None = None) -> Iterator[None]:
    """Hold an exclusive advisory lock on ``path`` (created if missing) inside the block.

    When another process holds it, ``waiting`` (if given) is shown as a progress message before
    blocking. The lock goes with the process, so a killed holder never leaves it stuck.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        if fcntl is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if waiting:
                    message(waiting)
                fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
