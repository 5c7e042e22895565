"""Fixtures of the fuzz suite: one worker process per module, a fresh folder per case."""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.fuzz.sandbox import Outcome, Sandbox


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    from llmc.targets.torch import qkernels

    qkernels.load()  # the first build of the CPU kernels (a minute on a new machine) is not a timed case
    box = Sandbox()
    yield box
    box.close()


class Cases:
    """Fresh folders, one per hypothesis example (function-scoped tmp_path does not reset between examples)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._ids = itertools.count()

    def new(self) -> Path:
        path = self.root / f"case{next(self._ids)}"
        path.mkdir()
        return path


@pytest.fixture(scope="module")
def cases(tmp_path_factory: pytest.TempPathFactory) -> Cases:
    return Cases(tmp_path_factory.mktemp("fuzz"))


def assert_clean(outcome: Outcome, what: str) -> None:
    """A clear LlmcError or success; not a traceback, a hang, unbounded memory or a touched path.

    ``LLMC_FUZZ_LOG=FILE`` appends every case's outcome to FILE (JSON lines), to see what a run reached."""
    log = os.environ.get("LLMC_FUZZ_LOG")
    if log:
        with open(log, "a") as f:
            f.write(json.dumps({"case": what[-300:], "status": outcome.status, "type": outcome.error_type,
                                "detail": outcome.detail[:300]}) + "\n")
    assert outcome.clean, f"{what}: {outcome.status} {outcome.error_type}\n{outcome.detail}"
    if outcome.status == "error":
        assert "\n" not in outcome.detail.strip(), f"{what}: a multi-line error: {outcome.detail}"
