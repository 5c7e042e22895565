"""The package import graph flows one way (docs/architecture.md): every ``import llmc.X`` and
``from llmc.X import``, function-level and ``TYPE_CHECKING`` ones included, and any
``importlib.import_module("llmc...")`` with a literal name, is an edge."""

from __future__ import annotations

import ast
import itertools
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDERS = {"compiler": "llmc.compiler", "passes": "llmc.passes", "runtime": "llmc.runtime",
           "targets": "llmc.targets", "llmc": "llmc"}
LAYERS = ["compiler", "passes", "runtime", "targets", "llmc"]
"""Bottom to top: a package may import only packages before it (``llmc`` is the top: the CLI,
the compile driver, the accuracy gate and the public API)."""


def _module_name(path: Path) -> str:
    folder = path.relative_to(ROOT).parts[0]
    rest = path.relative_to(ROOT / folder).with_suffix("").parts
    if rest[-1] == "__init__":
        rest = rest[:-1]
    return ".".join([FOLDERS[folder], *rest])


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)  # from llmc import driver
        elif (isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module"
              and node.args and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            names.add(node.args[0].value)
    return {n for n in names if n == "llmc" or n.startswith("llmc.")}


def _packages() -> set[str]:
    found = set()
    for folder, package in FOLDERS.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            found.add(".".join([package, *init.parent.relative_to(ROOT / folder).parts]))
    return found


def _owner(module: str, packages: set[str]) -> str:
    """The innermost package holding ``module`` (a package is its own owner)."""
    parts = module.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in packages:
            return candidate
    return "llmc"


def _edges() -> dict[tuple[str, str], set[str]]:
    """(importing package, imported package) -> the files with such an import."""
    packages = _packages()
    edges: dict[tuple[str, str], set[str]] = defaultdict(set)
    for folder in FOLDERS:
        for path in (ROOT / folder).rglob("*.py"):
            if ".venv" in path.parts or "build" in path.parts:
                continue
            src = _owner(_module_name(path), packages)
            for name in _imported(ast.parse(path.read_text())):
                dst = _owner(name, packages)
                if dst != src:
                    edges[(src, dst)].add(str(path.relative_to(ROOT)))
    return edges


def _top(package: str) -> str:
    """The top-level folder of a package (``llmc.runtime.server`` -> ``runtime``; ``llmc.cli`` -> ``llmc``)."""
    parts = package.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in FOLDERS and parts[1] != "llmc" else "llmc"


def test_top_level_packages_import_only_downward() -> None:
    wrong = {}
    for (src, dst), files in _edges().items():
        a, b = _top(src), _top(dst)
        if a != b and LAYERS.index(b) > LAYERS.index(a):
            wrong[f"{src} -> {dst}"] = sorted(files)
    assert not wrong, f"imports against the layer order {LAYERS}: {wrong}"


def test_no_two_packages_import_each_other() -> None:
    edges = _edges()
    tops: dict[tuple[str, str], set[str]] = defaultdict(set)
    for (src, dst), files in edges.items():
        if _top(src) != _top(dst):
            tops[(_top(src), _top(dst))] |= files
    pairs = []
    for graph in (edges, tops):
        for a, b in itertools.combinations(sorted({p for e in graph for p in e}), 2):
            nested = a.startswith(b + ".") or b.startswith(a + ".")
            if not nested and (a, b) in graph and (b, a) in graph:
                pairs.append((a, b, sorted(graph[(a, b)]), sorted(graph[(b, a)])))
    assert not pairs, f"packages importing each other both ways: {pairs}"


def _target_of(package: str) -> str:
    """The target a package of ``llmc.targets`` belongs to (``llmc.targets.torch.cuda`` -> ``llmc.targets.torch``)."""
    return ".".join(package.split(".")[:3])


def test_targets_do_not_import_each_other_except_declared_reuse() -> None:
    allowed = {("llmc.targets.tensorrt", "llmc.targets.onnx")}  # the TensorRT graph reuses the ONNX builder
    crossing = {(s, d): f for (s, d), f in _edges().items()
                if s.startswith("llmc.targets.") and d.startswith("llmc.targets.")
                and _target_of(s) != _target_of(d) and (_target_of(s), _target_of(d)) not in allowed}
    assert not crossing, crossing


def test_the_walk_sees_function_level_and_type_checking_imports() -> None:
    code = ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from llmc.runtime.artifact import Artifact\n"
            "def f():\n    import llmc.targets.torch.executor\n    importlib.import_module('llmc.passes.dce')\n")
    assert _imported(ast.parse(code)) == {"llmc.runtime.artifact", "llmc.runtime.artifact.Artifact",
                                          "llmc.targets.torch.executor", "llmc.passes.dce"}
