"""The target contract: a code generator that writes an artifact's payload and loads it back
as an :class:`~llmc.runtime.executor.Executor`.

The runtime owns this contract (with the artifact format and the executor contract); each
target package (``llmc.targets.<name>``) implements it in ``target.py`` and is found by name
through :mod:`llmc.runtime.registry`. Callers read :meth:`Target.capabilities` instead of
branching on a target's name.

Adding a target is one folder and one registry line (docs/targets.md): ``targets/<name>/``
with ``target.py`` (this contract), ``lower.py`` (a
:class:`~llmc.targets.lowering.LoweringTable` giving every IR op a handler or a refusal; its
handled ops are :attr:`Capabilities.ops`) and ``executor.py`` (the
:class:`~llmc.runtime.executor.Executor`), plus ``<name> = "llmc.targets.<name>.target:<Class>"``
under ``[project.entry-points."llmc.targets"]`` in ``pyproject.toml``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from llmc.compiler.errors import ArtifactError, UnsupportedError
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.ops import BASE_OPS, FUSED_OPS
from llmc.compiler.quant_modes import QUANT_MODES
from llmc.compiler.weights import WeightStore
from llmc.runtime.executor import Executor

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact, ArtifactWriter

ALL_QUANT_MODES = frozenset(QUANT_MODES)


@dataclass(frozen=True)
class Capabilities:
    """What a target can do, declared once and read by the driver, the loader and the engine."""

    ops: frozenset[str]
    """IR ops it lowers: every base op and the fused ops it runs."""
    devices: tuple[str, ...]
    """Device kinds it builds for (``cpu``, ``cuda``, ``rocm``, ``cpu-ort``); ``cuda:1`` is kind ``cuda``."""
    kv_layout: Literal["paged", "slots"] = "paged"
    """``paged``: blocks of a shared pool per sequence; ``slots``: one fixed-capacity slot per sequence."""
    quant_modes: frozenset[str] = ALL_QUANT_MODES
    """The ``--quant`` modes whose weights it lowers (:data:`llmc.compiler.quant_modes.QUANT_MODES`)."""
    gguf_blocks: frozenset[str] = frozenset()
    """GGUF block types (:data:`llmc.compiler.ggml_blocks.FORMATS` names) it runs as stored with
    ``--quant native``; the driver converts others to llmc's int4/int8 layout where that is exact
    (Q8_0, Q4_0, Q4_1) and dequantizes the rest to float32, with a note."""
    deterministic: bool = False
    """Whether it has a batch-invariant mode (greedy results independent of batching)."""
    stores_weights: bool = False
    """True when the payload holds the weights: the driver then writes no ``weights/`` copy and
    :meth:`Target.read_weights` reads them back from the payload."""
    runs_in_memory: bool = False
    """Whether :meth:`Target.load_module` runs a module without writing an artifact."""

    @property
    def fused_ops(self) -> frozenset[str]:
        """The fused ops among :attr:`ops` (passes producing others are left out of pipelines)."""
        return self.ops & FUSED_OPS

    def device_kind(self, device: str) -> str:
        """``device``'s kind (``cuda:1`` -> ``cuda``), refused unless the target builds for it (or
        the index after the colon is not a number)."""
        kind, colon, index = str(device).partition(":")
        if kind not in self.devices or (colon and not index.isdigit()):
            raise UnsupportedError(f"unknown device {device!r} for this target; it builds for "
                                   f"{', '.join(self.devices)} (optionally with an index, e.g. cuda:1)")
        return kind

    def to_dict(self) -> dict[str, Any]:
        return {"fused_ops": sorted(self.fused_ops), "devices": list(self.devices), "kv_layout": self.kv_layout,
                "quant_modes": sorted(self.quant_modes), "gguf_blocks": sorted(self.gguf_blocks),
                "deterministic": self.deterministic,
                "stores_weights": self.stores_weights, "runs_in_memory": self.runs_in_memory}


def lowered_ops(*fused: str, refused: Iterable[str] = ()) -> frozenset[str]:
    """Every base op except ``refused``, plus the given fused ops (what targets declare as
    :attr:`Capabilities.ops`; ``tests/targets/test_op_tables.py`` checks it against each
    target's lowering table)."""
    unknown = set(fused) - FUSED_OPS
    if unknown:
        raise ValueError(f"not fused ops: {sorted(unknown)}")
    not_base = set(refused) - BASE_OPS
    if not_base:
        raise ValueError(f"not base ops: {sorted(not_base)}")
    return (BASE_OPS - frozenset(refused)) | frozenset(fused)


@dataclass(frozen=True)
class TargetOption:
    """One option a target reads at compile or load time: its name, type and allowed values."""

    name: str
    kind: type
    """``int``, ``float``, ``bool`` or ``str``: values given as text (the CLI's ``KEY=VALUE``) are converted."""
    doc: str
    choices: tuple[Any, ...] = ()
    """The allowed values (empty: any value of :attr:`kind`)."""
    minimum: float | None = None
    optional: bool = False
    """Whether None is a value (e.g. a setting that does not apply to some builds)."""

    def parse(self, value: Any, stage: str) -> Any:
        """``value`` as :attr:`kind`, checked against :attr:`choices` and :attr:`minimum`."""
        where = f"{stage} option {self.name}"
        if value is None and self.optional:
            return None
        converted = _convert(value, self.kind)
        if converted is None:
            raise UnsupportedError(f"{where} expects {_KIND_NAMES[self.kind]}, got {value!r}")
        if self.choices and converted not in self.choices:
            raise UnsupportedError(f"{where} must be one of {', '.join(map(str, self.choices))}, got {value!r}")
        if self.minimum is not None and converted < self.minimum:
            raise UnsupportedError(f"{where} must be at least {self.minimum:g}, got {value!r}")
        return converted


_KIND_NAMES = {int: "an integer", float: "a number", bool: "a boolean (1/0, true/false)", str: "a string"}
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or None when it is not one."""
    text = value.strip().lower() if isinstance(value, str) else None
    if kind is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        return True if text in _TRUE else False if text in _FALSE else None
    if kind is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if text is not None and text.lstrip("+-").isdigit():
            return int(text)
        return None
    if kind is float:
        try:
            number = float(value) if not isinstance(value, bool) else None
        except (TypeError, ValueError):
            return None
        return number if number is not None and math.isfinite(number) else None
    if kind is str:
        if isinstance(value, str):
            return value or None
        return str(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None
    raise TypeError(f"unsupported option kind {kind!r}")


def check_options(target: Target, options: dict[str, Any], stage: Literal["compile", "load"]) -> dict[str, Any]:
    """``options`` converted and checked against the target's declared :attr:`Target.compile_options` or
    :attr:`Target.load_options`; an unknown key (one the target would ignore) is refused, listing the valid ones."""
    declared = {o.name: o for o in (target.compile_options if stage == "compile" else target.load_options)}
    unknown = sorted(set(options) - set(declared))
    if unknown:
        valid = ", ".join(sorted(declared)) or "none"
        plural = "s" if len(unknown) > 1 else ""
        raise UnsupportedError(f"target {target.name!r} does not take the {stage} option{plural} "
                               f"{', '.join(unknown)}; its {stage} options: {valid}")
    return {key: declared[key].parse(value, stage) for key, value in options.items()}


@dataclass
class EmitResult:
    """What a target records in the manifest about its payload."""

    options: dict[str, Any]
    files: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class Target(ABC):
    """A code generator plus the loader of what it generates."""

    name: ClassVar[str]
    doc: ClassVar[str]
    compile_options: ClassVar[tuple[TargetOption, ...]] = ()
    """The target options :meth:`emit` reads (``--target-option KEY=VALUE``, ``--arch``, ``--tune``);
    the driver refuses any other key, listing these (``device`` comes from ``--device``)."""
    load_options: ClassVar[tuple[TargetOption, ...]] = ()
    """The options :meth:`load` reads besides ``device``, ``threads`` and ``deterministic`` (which every
    target takes); the loader refuses any other key, listing these."""

    @abstractmethod
    def capabilities(self) -> Capabilities:
        """Ops, devices, KV layout, quant modes and modes this target supports (cheap, no imports
        of the backend: callers read it before deciding anything)."""

    def availability(self) -> str | None:
        """None when usable here, else the reason it is not (a missing backend, no GPU)."""
        return None

    def preferred_passes(self, opt_level: int) -> list[str] | None:
        """The pass list this target wants at ``opt_level`` (None: the generic pipeline)."""
        return None

    def rewrites(self, opt_level: int) -> list[str]:
        """Target-specific rewrites: passes (pipeline items, arguments as in ``--passes``) the
        driver runs after the optimization pipeline (or ``--passes``) and before ``quantize``,
        recorded in the manifest's pipeline like the others. They bring the module into the
        form this target's lowering relies on (its lowering table refuses the other form), so
        a target that needs one asks for it at every level, ``O0`` included."""
        return []

    @abstractmethod
    def emit(self, module: Module, weights: WeightStore, writer: ArtifactWriter, options: dict[str, Any]) -> EmitResult:
        """Write the target payload into ``writer`` (weights and IR are written by the driver,
        unless the target stores the weights itself). Raises :class:`~llmc.errors.LlmcError`
        naming the op, shape or option it cannot lower; nothing is written on failure."""

    @abstractmethod
    def load(self, artifact: Artifact, **options: Any) -> Executor:
        """Load an artifact written by :meth:`emit` (``options``: ``device``, ``threads``,
        ``block_size``, ``deterministic`` and the target's own load options)."""

    def load_module(self, module: Module, weights: WeightStore, **options: Any) -> Executor:
        """An executor for an in-memory module and its weights, without an artifact (only where
        :attr:`Capabilities.runs_in_memory`; the accuracy gate scores candidates this way)."""
        raise UnsupportedError(f"target {self.name!r} runs only compiled artifacts, not in-memory modules")

    def read_weights(self, artifact: Artifact) -> WeightStore:
        """The params of an artifact whose payload stores them (:attr:`Capabilities.stores_weights`)."""
        raise ArtifactError(f"{artifact.path}: target {self.name!r} keeps no weights in its payload")

    def kv_layout(self, artifact: Artifact) -> tuple[int, int]:
        """(KV bytes per token, tokens per block) of an artifact's cache, without loading it (the capacity
        report, :mod:`llmc.runtime.capacity`). The default reads the ``kv_dtype`` or ``activation_dtype``
        compile option (float32 when neither is recorded) and a ``block_size`` option (16); a slot cache
        (``Capabilities.kv_layout == "slots"``) holds ``kv_capacity`` tokens (the context) per sequence."""
        from llmc.runtime.capacity import kv_bytes_per_token

        options = artifact.target_options
        dtype = str(options.get("kv_dtype") or options.get("activation_dtype") or "float32")
        if self.capabilities().kv_layout == "slots":
            block = int(options.get("kv_capacity") or artifact.config.max_position)
        else:
            block = int(options.get("block_size") or 16)
        return kv_bytes_per_token(artifact.config, dtype), block
