"""Targets by name. Each target registers itself with one line in ``pyproject.toml``::

    [project.entry-points."llmc.targets"]
    torch = "llmc.targets.torch.target:TorchTarget"

so the runtime finds implementations of its :class:`~llmc.runtime.target.Target` contract
without importing the target packages (they import the runtime, not the other way round),
and a target shipped by another distribution registers the same way.
"""

from __future__ import annotations

import functools
from importlib.metadata import EntryPoint, entry_points

from llmc.compiler.errors import TargetUnavailableError, UnsupportedError
from llmc.runtime.target import Target

GROUP = "llmc.targets"


@functools.cache
def _entry_points() -> dict[str, EntryPoint]:
    found: dict[str, EntryPoint] = {}
    for ep in entry_points(group=GROUP):
        found.setdefault(ep.name, ep)  # the first distribution on sys.path wins, as for imports
    return found


def target_names() -> list[str]:
    """Every registered target, in registration order."""
    names = list(_entry_points())
    if not names:
        raise TargetUnavailableError(f"no llmc targets are registered (entry points {GROUP!r}); "
                                     "is llmc installed (pip install -e .)?")
    return names


def get_target(name: str) -> Target:
    """The target called ``name``; raises a clear error if unknown or its package cannot be imported."""
    ep = _entry_points().get(name)
    if ep is None:
        raise UnsupportedError(f"unknown target {name!r}; available: {', '.join(target_names())}")
    try:
        cls = ep.load()
    except ImportError as exc:
        raise TargetUnavailableError(f"target {name!r} cannot be imported: {exc}") from exc
    target = cls()
    if not isinstance(target, Target):
        raise TargetUnavailableError(f"entry point {ep.value!r} for target {name!r} is not an llmc Target")
    return target


def require_available(target: Target) -> None:
    """Raise :class:`TargetUnavailableError` with the reason when ``target`` cannot run here."""
    reason = target.availability()
    if reason is not None:
        raise TargetUnavailableError(f"target {target.name!r} is not available here: {reason}")
