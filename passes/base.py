"""What a pass is: a name, a one-line doc and ``run(module, ctx) -> PassResult``."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

from llmc.compiler.ir.graph import Module
from llmc.compiler.weights import WeightStore


@dataclass
class PassContext:
    """What passes may read or extend beside the IR: the weights (fusions concatenate them
    at compile time) and the ops the chosen target can lower."""

    weights: WeightStore
    target_ops: frozenset[str]
    target_name: str = "reference"
    options: dict[str, Any] = field(default_factory=dict)
    derived_params: dict[str, tuple[str, ...]] = field(default_factory=dict)
    """Params made by concatenating others (name -> sources), so functions share them."""


@dataclass
class PassResult:
    """The rewritten module, whether anything changed, counters (``matches``, ``rejected``,
    ...) and, for rule passes, how many matches each reason rejected."""

    module: Module
    changed: bool
    stats: dict[str, int] = field(default_factory=dict)
    rejections: dict[str, int] = field(default_factory=dict)


class Pass(ABC):
    """A module-to-module rewrite."""

    name: ClassVar[str]
    doc: ClassVar[str]
    produces: ClassVar[frozenset[str]] = frozenset()
    """Fused ops this pass may introduce (checked against the target's capabilities)."""

    @abstractmethod
    def run(self, module: Module, ctx: PassContext) -> PassResult:
        """Rewrite ``module``; never mutate nodes in place."""

    def describe(self) -> str:
        return self.name
