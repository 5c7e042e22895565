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
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import ArtifactError
from llmc.compiler.ir.graph import Module
from llmc.compiler.ir.parser import parse_module
from llmc.compiler.ir.printer import print_module
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.compiler.version import __version__
from llmc.compiler.weights import QuantizedTensor, Weight, WeightStore

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
    """Writes an artifact into a temporary directory and renames it into place on success."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.tmp = self.out.with_name(f".{self.out.name}.tmp-{os.getpid()}")
        self.param_records: dict[str, Any] = {}

    def __enter__(self) -> ArtifactWriter:
        if self.tmp.exists():
            shutil.rmtree(self.tmp)
        self.tmp.mkdir(parents=True)
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if exc_type is not None and self.tmp.exists():
            shutil.rmtree(self.tmp, ignore_errors=True)

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
                files[str(p.relative_to(self.tmp))] = {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
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
        if self.out.exists():
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            os.replace(self.out, old)
            os.replace(self.tmp, self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.tmp, self.out)
        return self.out


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
        """Load and (by default) verify checksums; errors name the file and the problem."""
        path = Path(path)
        manifest_path = path / MANIFEST
        if not path.is_dir():
            raise ArtifactError(f"{path}: not an artifact directory")
        try:
            manifest = json.loads(manifest_path.read_text())
        except FileNotFoundError as exc:
            raise ArtifactError(f"{path}: no {MANIFEST}; not an llmc artifact") from exc
        except json.JSONDecodeError as exc:
            raise ArtifactError(f"{manifest_path}: corrupt JSON: {exc}") from exc
        if manifest.get("format") != FORMAT:
            raise ArtifactError(f"{manifest_path}: format is {manifest.get('format')!r}, not {FORMAT!r}")
        version = manifest.get("schema_version")
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise ArtifactError(
                f"{path}: artifact schema version {version} is newer than this llmc supports "
                f"({SCHEMA_VERSION}); upgrade llmc or recompile",
            )
        if verify:
            verify_files(path, manifest)
        module = parse_module((path / IR_FILE).read_text())
        return cls(path, manifest, module)


def verify_files(path: Path, manifest: dict[str, Any]) -> None:
    for relative, record in manifest.get("files", {}).items():
        file = path / relative
        if not file.exists():
            raise ArtifactError(f"{path}: file {relative} is missing")
        if file.stat().st_size != record["bytes"]:
            raise ArtifactError(f"{file}: size {file.stat().st_size} != recorded {record['bytes']} (truncated?)")
        if sha256_file(file) != record["sha256"]:
            raise ArtifactError(f"{file}: sha256 does not match the manifest (file changed or corrupt)")


def _load_weight(path: str, name: str, record: dict[str, Any]) -> Weight:
    with safe_open(path, framework="np") as f:
        if "quant" not in record:
            return f.get_tensor(name)
        spec = QuantSpec.parse(record["quant"], record["scale_dtype"])
        if spec.ggml is not None:
            return QuantizedTensor.from_ggml(spec.ggml, tuple(record["shape"]), f.get_tensor(f"{name}.qdata"))
        offsets = f.get_tensor(f"{name}.offsets") if not spec.symmetric else None
        return QuantizedTensor(spec, tuple(record["shape"]), f.get_tensor(f"{name}.qdata"),
                               f.get_tensor(f"{name}.scales"), offsets)
