"""Artifacts: one directory holding everything needed to run a compiled model.

    manifest.json            format, schema version, versions, checksums, config, target, ...
    weights/model.safetensors  params by IR name; quantized ones as NAME.qdata/.scales/.offsets
                             (GGUF blocks kept as stored: NAME.qdata only)
    tokenizer/               tokenizer.json + llmc_tokenizer.json (when the model has one)
    ir/final.ir              the IR after the pass pipeline
    target/                  the target's payload

Artifacts are written to a temporary sibling directory and renamed into place at the end, so
a failed compile never leaves a half-written artifact. Loading checks the schema version and
every file's sha256 before anything runs.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llmc.compiler.atomic_output import AtomicOutput, check_output
from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import ArtifactError, InputError, IRError, LlmcError
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.parser import parse_module
from llmc.compiler.ir.printer import print_module
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.compiler.version import __version__
from llmc.compiler.weights import NUMPY_DTYPES, QuantizedTensor, Weight, WeightStore

FORMAT = "llmc-artifact"
SCHEMA_VERSION = 1
MANIFEST = "manifest.json"
WEIGHTS_FILE = "weights/model.safetensors"
IR_FILE = "ir/final.ir"
TOKENIZER_DIR = "tokenizer"
TARGET_DIR = "target"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def flatten_weights(weights: dict[str, Weight]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Tensors to store and the per-param records describing them."""
    tensors: dict[str, np.ndarray] = {}
    records: dict[str, Any] = {}
    for name, w in weights.items():
        if isinstance(w, QuantizedTensor):
            tensors[f"{name}.qdata"] = w.qdata
            if w.ggml_format is None:  # GGUF blocks carry their scales
                tensors[f"{name}.scales"] = w.scales
            if w.offsets is not None:
                tensors[f"{name}.offsets"] = w.offsets
            records[name] = {"shape": list(w.shape), "quant": w.spec.describe(),
                             "scale_dtype": w.spec.scale_dtype, "bytes": w.nbytes}
        else:
            arr = np.ascontiguousarray(w)
            tensors[name] = arr
            records[name] = {"shape": list(arr.shape), "dtype": str(arr.dtype), "bytes": arr.nbytes}
    return tensors, records


class ArtifactWriter:
    """Writes an artifact into a temporary directory and renames it into place on success.

    An existing ``out`` is replaced only when it is an llmc artifact (:func:`is_artifact_dir`) or an
    empty folder; anything else, and an ``out`` that is or holds one of ``inputs`` (the source
    model, calibration files), is refused before any work (:mod:`llmc.compiler.atomic_output`)."""

    def __init__(self, out: str | Path, inputs: Iterable[Path] = ()) -> None:
        self.out = Path(out)
        self._output = AtomicOutput(self.out, replaceable=is_artifact_dir, what="an llmc artifact", inputs=inputs)
        self.tmp = self._output.tmp
        self.param_records: dict[str, Any] = {}

    def check(self) -> None:
        """Refuse ``out`` now (before a long compile) when the write would be refused at the end."""
        check_output(self.out, self._output.inputs, is_artifact_dir, self._output.what)

    def __enter__(self) -> ArtifactWriter:
        self._output.__enter__()
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._output.__exit__(exc_type, exc, tb)

    def path(self, relative: str) -> Path:
        p = self.tmp / relative
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def write_weights(self, module: Module, weights: WeightStore) -> None:
        used = {name: weights[name] for name in sorted(module.referenced_params())}
        tensors, self.param_records = flatten_weights(used)
        save_file(tensors, str(self.path(WEIGHTS_FILE)), metadata={"format": "llmc"})

    def record_weights(self, module: Module, weights: WeightStore) -> None:
        """Record the params in the manifest without writing ``weights/`` (the target payload holds them)."""
        used = {name: weights[name] for name in sorted(module.referenced_params())}
        self.param_records = flatten_weights(used)[1]

    def write_ir(self, module: Module) -> None:
        self.path(IR_FILE).write_text(print_module(module))

    def write_tokenizer(self, tokenizer: LlmcTokenizer | None) -> None:
        if tokenizer is not None:
            tokenizer.save(self.path(TOKENIZER_DIR))

    def finish(self, manifest: dict[str, Any]) -> Path:
        """Checksum every file, write the manifest and move the artifact into place."""
        files = {}
        for p in sorted(self.tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(self.tmp).as_posix()] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        full = {
            "format": FORMAT,
            "schema_version": SCHEMA_VERSION,
            "llmc_version": __version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **manifest,
            "params": self.param_records,
            "files": files,
        }
        (self.tmp / MANIFEST).write_text(json.dumps(full, indent=1, sort_keys=False))
        return self._output.commit()


@dataclass
class Artifact:
    """A loaded, verified artifact."""

    path: Path
    manifest: dict[str, Any]
    module: Module

    @property
    def config(self) -> ModelConfig:
        return ModelConfig.from_dict(self.manifest["model"])

    @property
    def target(self) -> str:
        return str(self.manifest["target"]["name"])

    @property
    def target_options(self) -> dict[str, Any]:
        return dict(self.manifest["target"].get("options", {}))

    def file(self, relative: str) -> Path:
        return self.path / relative

    def tokenizer(self) -> LlmcTokenizer | None:
        directory = self.path / TOKENIZER_DIR
        return LlmcTokenizer.load(directory) if directory.exists() else None

    def weights(self) -> WeightStore:
        """Every param, loaded lazily from the weights file (or from the target payload when it holds them)."""
        if self.manifest["target"].get("stores_weights") and not self.file(WEIGHTS_FILE).exists():
            from llmc.runtime.registry import get_target

            return get_target(self.target).read_weights(self)
        path = str(self.file(WEIGHTS_FILE))
        store = WeightStore()
        for name, record in self.manifest["params"].items():
            store.set_lazy(name, lambda n=name, r=record: _load_weight(path, n, r))
        return store

    @classmethod
    def load(cls, path: str | Path, verify: bool = True) -> Artifact:
        """Load and (by default) verify checksums; errors name the file and the problem.

        The manifest's structure is always checked; ``verify`` adds the per-file size and sha256
        checks, which cover every file of the artifact (an unlisted file is refused)."""
        path = Path(path)
        manifest = read_manifest(path)
        if verify:
            verify_files(path, manifest)
        ir_path = path / IR_FILE
        try:
            module = parse_module(ir_path.read_text())
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path}: file {IR_FILE} is missing") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise ArtifactError(f"{ir_path}: cannot be read: {exc}") from exc
        except IRError as exc:
            raise ArtifactError(f"{ir_path}: {exc}") from exc
        _check_against_ir(path, manifest, module)
        return cls(path, manifest, module)


def _check_against_ir(path: Path, manifest: dict[str, Any], module: Module) -> None:
    """The manifest's model config and param records agree with the (checksummed) IR."""
    where = path / MANIFEST
    try:
        same = not module.config or ModelConfig.from_dict(module.config) == ModelConfig.from_dict(manifest["model"])
    except InputError as exc:
        raise ArtifactError(f"{path / IR_FILE}: its model config is invalid: {exc}") from exc
    if not same:
        raise ArtifactError(f"{where}: model differs from the config in {IR_FILE} (edited manifest? recompile)")
    params = manifest["params"]
    for name in sorted(module.referenced_params()):
        record = params.get(name)
        if record is None:
            raise ArtifactError(f"{where}: params lacks {name!r}, which {IR_FILE} uses (edited manifest? recompile)")
        info = module.params.get(name)
        if info is not None and [int(d) for d in info.type.shape if isinstance(d, int)] != list(record["shape"]):
            raise ArtifactError(f"{where}: params.{name}.shape {record['shape']} differs from {IR_FILE}'s "
                                f"{list(info.type.shape)} (edited manifest? recompile)")


def read_manifest(path: Path) -> dict[str, Any]:
    """The manifest of the artifact at ``path``, checked for structure (keys and types the runtime reads)."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise ArtifactError(f"{path}: not an artifact directory")
    try:
        manifest = json.loads(manifest_path.read_text())
    except FileNotFoundError as exc:
        raise ArtifactError(f"{path}: no {MANIFEST}; not an llmc artifact") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ArtifactError(f"{manifest_path}: cannot be read: {exc}") from exc
    except (json.JSONDecodeError, RecursionError) as exc:
        raise ArtifactError(f"{manifest_path}: corrupt JSON: {exc}") from exc
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: must hold a JSON object, got {type(manifest).__name__}; "
                            "not an llmc artifact")
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{manifest_path}: format is {manifest.get('format')!r}, not {FORMAT!r}")
    version = manifest.get("schema_version")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise ArtifactError(f"{manifest_path}: schema_version must be a positive integer, got {version!r}")
    if version > SCHEMA_VERSION:
        raise ArtifactError(
            f"{path}: artifact schema version {version} is newer than this llmc supports "
            f"({SCHEMA_VERSION}); upgrade llmc or recompile",
        )
    problem = _schema_problem(manifest, MANIFEST_SCHEMA, "")
    for key, schema in (("quantization", QUANTIZATION_SCHEMA), ("quality", QUALITY_SCHEMA)):
        if problem is None and manifest.get(key) is not None:
            problem = _schema_problem(manifest[key], schema, f"{key}.")
    calibration = (manifest.get("quantization") or {}).get("calibration") if problem is None else None
    if calibration is not None:
        problem = _schema_problem(calibration, CALIBRATION_SCHEMA, "quantization.calibration.")
    if problem is None:
        try:
            ModelConfig.from_dict(manifest["model"])
        except InputError as exc:
            problem = f"model: {exc}"
    if problem is None:
        problem = _params_problem(manifest["params"])
    if problem is None:
        problem = _files_problem(manifest["files"])
    if problem is not None:
        raise ArtifactError(f"{manifest_path}: {problem} (edited or corrupt? recompile the model)")
    return manifest


# The manifest keys the runtime (loader, targets, inspect) reads, with their types: a dict gives the
# keys of an object (a key ending in "?" is optional), a one-element list the type of a list's items.
_Number = (int, float)
MANIFEST_SCHEMA: dict[str, Any] = {
    "llmc_version": str,
    "source": {"kind": str, "path": str, "files?": dict},
    "model": dict,
    "target": {"name": str, "options?": dict, "files?": [str], "notes?": [str], "stores_weights?": bool},
    "pipeline": {"opt_level": int, "custom?": (str, type(None)),
                 "passes": [{"name": str, "changed": bool, "seconds": _Number, "stats": dict, "rejections?": dict}]},
    "params": dict,
    "files": dict,
    "entries?": dict,
    "tokenizer?": bool,
    "quantization?": (dict, type(None)),
    "quality?": (dict, type(None)),
}
QUANTIZATION_SCHEMA: dict[str, Any] = {"mode": str, "calibration?": (dict, type(None))}
CALIBRATION_SCHEMA: dict[str, Any] = {"method": str, "tokens": int}
QUALITY_SCHEMA: dict[str, Any] = {
    "eval_file": str, "tokens": int, "ppl_increase": _Number, "max_ppl_increase?": (*_Number, type(None)),
    "reference": {"perplexity": _Number}, "quantized": {"perplexity": _Number, "kl_mean": (*_Number, type(None)),
                                                        "top1_agreement": (*_Number, type(None))},
}


def _type_name(expected: Any) -> str:
    if isinstance(expected, tuple):
        return " or ".join(_type_name(t) for t in expected)
    if isinstance(expected, dict):
        return "an object"
    if isinstance(expected, list):
        return "a list"
    return {str: "a string", int: "an integer", float: "a number", bool: "true or false", dict: "an object",
            list: "a list", type(None): "null"}.get(expected, expected.__name__)


def _schema_problem(value: Any, expected: Any, where: str) -> str | None:
    """What is wrong with ``value`` against ``expected`` (see :data:`MANIFEST_SCHEMA`), or None."""
    if isinstance(expected, dict):
        if not isinstance(value, dict):
            return f"{where.rstrip('.') or 'the manifest'} must be an object"
        for key, sub in expected.items():
            name = key.rstrip("?")
            if name not in value:
                if key.endswith("?"):
                    continue
                return f"missing key {where + name!r}"
            problem = _schema_problem(value[name], sub, f"{where}{name}.")
            if problem is not None:
                return problem
        return None
    label = where.rstrip(".")
    if isinstance(expected, list):
        if not isinstance(value, list):
            return f"{label} must be a list"
        for i, item in enumerate(value):
            problem = _schema_problem(item, expected[0], f"{label}[{i}].")
            if problem is not None:
                return problem
        return None
    types = expected if isinstance(expected, tuple) else (expected,)
    bad_bool = isinstance(value, bool) and bool not in types
    if bad_bool or not isinstance(value, types):
        return f"{label} must be {_type_name(expected)}, got {json.dumps(value)[:60]}"
    return None


def _is_size(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _params_problem(params: dict[str, Any]) -> str | None:
    for name, record in params.items():
        where = f"params.{name}"
        if not isinstance(record, dict):
            return f"{where} must be an object"
        shape = record.get("shape")
        if not isinstance(shape, list) or not all(_is_size(d) for d in shape):
            return f"{where}.shape must be a list of sizes, got {shape!r}"
        if "quant" in record:
            try:
                QuantSpec.parse(record["quant"], record.get("scale_dtype"))
            except (LlmcError, ValueError, TypeError, KeyError, AttributeError) as exc:
                return f"{where}.quant {record.get('quant')!r} / scale_dtype {record.get('scale_dtype')!r}: {exc}"
        elif record.get("dtype") not in NUMPY_DTYPES:
            return f"{where}.dtype must be one of {', '.join(NUMPY_DTYPES)}, got {record.get('dtype')!r}"
    return None


def _files_problem(files: dict[str, Any]) -> str | None:
    for relative, record in files.items():
        if not _inside_relative(relative) or relative == MANIFEST:
            return f"files: {relative!r} is not a path inside the artifact"
        if not isinstance(record, dict) or not _is_size(record.get("bytes")) or not (
                isinstance(record.get("sha256"), str) and len(record["sha256"]) == 64):
            return f"files.{relative} must hold bytes (a size) and sha256 (64 hex digits)"
    return None


def _inside_relative(relative: str) -> bool:
    """Whether ``relative`` is a plain relative path that stays inside the folder it is relative to."""
    parts = PurePosixPath(relative).parts
    return (bool(parts) and not relative.startswith("/") and "\\" not in relative
            and all(p not in ("", ".", "..") for p in parts) and ":" not in parts[0])


def _present_files(path: Path) -> list[str]:
    """Every file and link under ``path`` except the manifest, as relative POSIX paths."""
    return sorted(p.relative_to(path).as_posix() for p in path.rglob("*")
                  if (p.is_file() or p.is_symlink()) and p.relative_to(path).as_posix() != MANIFEST)


def required_files(manifest: dict[str, Any]) -> list[str]:
    """Files an artifact cannot run without: the IR, the weights (unless the payload holds them),
    the target's payload files."""
    files = [IR_FILE, *(manifest["target"].get("files") or [])]
    if not manifest["target"].get("stores_weights"):
        files.append(WEIGHTS_FILE)
    return files


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    """Every file of the artifact is listed in the manifest and matches its size and sha256; no
    listed path leaves the artifact; the files the runtime needs are listed."""
    listed: dict[str, Any] = manifest["files"]
    root = path.resolve()
    for relative in required_files(manifest):
        if relative not in listed:
            raise ArtifactError(f"{path}: the manifest does not list {relative}, so it cannot be verified "
                                "(edited or corrupt manifest? recompile)")
    unlisted = [f for f in _present_files(path) if f not in listed]
    if unlisted:
        raise ArtifactError(f"{path}: file {unlisted[0]} is not listed in the manifest"
                            + (f" (and {len(unlisted) - 1} more)" if len(unlisted) > 1 else "")
                            + "; files added after compiling are refused: remove them or recompile")
    for relative, record in listed.items():
        file = path / relative
        if file.is_symlink() or not file.exists():
            if file.is_symlink():
                raise ArtifactError(f"{path}: file {relative} is a symbolic link; artifacts hold plain files")
            raise ArtifactError(f"{path}: file {relative} is missing")
        if root not in file.resolve().parents:
            raise ArtifactError(f"{path}: file {relative} lies outside the artifact")
        if not file.is_file():
            raise ArtifactError(f"{path}: {relative} is not a file")
        if file.stat().st_size != record["bytes"]:
            raise ArtifactError(f"{file}: size {file.stat().st_size} != recorded {record['bytes']} (truncated?)")
        if sha256_file(file) != record["sha256"]:
            raise ArtifactError(f"{file}: sha256 does not match the manifest (file changed or corrupt)")


def is_artifact_dir(path: Path) -> bool:
    """Whether ``path`` is an llmc artifact holding only files its manifest lists (what a compile may
    replace). Checksums are not read: a damaged artifact is still llmc's own."""
    try:
        manifest = read_manifest(path)
    except ArtifactError:
        return False
    return all(f in manifest["files"] for f in _present_files(path))


def _load_weight(path: str, name: str, record: dict[str, Any]) -> Weight:
    try:
        with safe_open(path, framework="np") as f:
            if "quant" not in record:
                return _checked(f.get_tensor(name), record, name, path)
            spec = QuantSpec.parse(record["quant"], record["scale_dtype"])
            if spec.ggml is not None:  # GGUF blocks as stored: they carry their scales
                return QuantizedTensor.from_ggml(spec.ggml, tuple(record["shape"]), f.get_tensor(f"{name}.qdata"))
            offsets = f.get_tensor(f"{name}.offsets") if not spec.symmetric else None
            return QuantizedTensor(spec, tuple(record["shape"]), f.get_tensor(f"{name}.qdata"),
                                   f.get_tensor(f"{name}.scales"), offsets)
    except LlmcError:
        raise
    except Exception as exc:  # safetensors raises its own error type; QuantizedTensor ValueError on bad shapes
        raise ArtifactError(f"{path}: param {name!r} cannot be read as the manifest records it: {exc}") from exc


def _checked(array: np.ndarray, record: dict[str, Any], name: str, path: str) -> np.ndarray:
    if list(array.shape) != list(record["shape"]):
        raise ArtifactError(f"{path}: param {name!r} has shape {list(array.shape)}, "
                            f"the manifest says {record['shape']}")
    return array
