"""Models compiled on first use: ``llmc run model.gguf`` (and ``chat``, ``serve``, ``eval``,
``bench``, :func:`llmc.load`) compile a GGUF file or a Hugging Face folder once into the artifact
cache and reuse that build afterwards.

The cache is ``$LLMC_ARTIFACTS``, else ``<llmc cache>/artifacts`` (``~/.cache/llmc/artifacts``;
see :func:`llmc.compiler.paths.cache_dir`). An entry is named after the source, its compile
options and a key: the sha256 of the source's bytes, the options and llmc's version, so a changed
file or other options make a new build. Source checksums are remembered by (path, size,
modification time), so a cache hit does not read the whole model again. Two processes that want
the same build at once take turns on a lock file: one compiles, the other waits and reuses it
(the build itself is written to a temporary folder and renamed into place when complete).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.compiler.errors import ArtifactError, InputError, LlmcError
from llmc.compiler.locks import file_lock
from llmc.compiler.paths import cache_dir
from llmc.compiler.progress import message, step
from llmc.compiler.version import __version__
from llmc.driver import CompileOptions, compile_model
from llmc.runtime.artifact import MANIFEST, sha256_file

MODEL_FILE_SUFFIXES = (".json", ".safetensors", ".model", ".txt", ".jinja", ".tiktoken")
"""The files of a Hugging Face folder that make up the model (config, weights, tokenizer)."""

LOCKS = ".locks"
CHECKSUMS = ".checksums"


def artifacts_dir() -> Path:
    """``$LLMC_ARTIFACTS``, else ``<llmc cache>/artifacts``."""
    env = os.environ.get("LLMC_ARTIFACTS")
    return Path(env) if env else cache_dir() / "artifacts"


def is_artifact(path: str | Path) -> bool:
    """True when ``path`` is a compiled llmc artifact (a folder with a manifest)."""
    return (Path(path) / MANIFEST).is_file()


def _is_gguf(path: Path) -> bool:
    if path.suffix == ".gguf":
        return True
    try:
        with path.open("rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:
        return False


def source_kind(path: str | Path) -> str:
    """``artifact``, ``gguf`` or ``hf``, or an :class:`InputError` saying what ``path`` is not."""
    path = Path(path)
    if is_artifact(path):
        return "artifact"
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        if (path / "config.json").is_file():
            return "hf"
        raise ArtifactError(f"{path}: no {MANIFEST}; not an llmc artifact, and no config.json, so not a "
                            "Hugging Face model folder either")
    if _is_gguf(path):
        return "gguf"
    raise InputError(f"{path}: not an llmc artifact, a GGUF file or a Hugging Face model folder")


def source_files(path: Path) -> list[Path]:
    """The files a source is compiled from: the GGUF itself, or a folder's model files."""
    if path.is_file():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_FILE_SUFFIXES)


def _remembered_sha256(path: Path) -> str:
    """sha256 of one file, remembered by (resolved path, size, mtime) under the cache's ``.checksums``."""
    real = path.resolve()
    st = real.stat()
    memo = artifacts_dir() / CHECKSUMS / (hashlib.sha1(str(real).encode()).hexdigest() + ".json")
    stamp = {"path": str(real), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    try:
        saved = json.loads(memo.read_text())
        if {k: saved.get(k) for k in stamp} == stamp and isinstance(saved.get("sha256"), str):
            return str(saved["sha256"])
    except (OSError, ValueError):
        pass
    digest = sha256_file(real)
    memo.parent.mkdir(parents=True, exist_ok=True)
    partial = memo.with_name(f"{memo.name}.{os.getpid()}.part")
    partial.write_text(json.dumps({**stamp, "sha256": digest}))
    os.replace(partial, memo)
    return digest


def source_checksum(path: str | Path) -> str:
    """sha256 over a source's files (names and contents)."""
    path = Path(path)
    files = source_files(path)
    with step(f"checksum of {path.name}", total=len(files)) as progress:
        lines = []
        for f in files:
            lines.append(f"{f.name}\0{_remembered_sha256(f)}\n")
            progress.advance(f.name)
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def default_options(path: str | Path, target: str = "torch", quant: str | None = None,
                    device: str | None = None) -> CompileOptions:
    """Compile options for a source compiled on first use: ``quant`` defaults to ``native`` (the
    file's quantized blocks as they are) for a GGUF file when the target lowers them, else ``none``."""
    from llmc.runtime.registry import get_target

    if quant is None:
        native = source_kind(path) == "gguf" and "native" in get_target(target).capabilities().quant_modes
        quant = "native" if native else "none"
    return CompileOptions(target=target, quant=quant, device=device or "cpu")


def entry_name(path: Path, options: CompileOptions, checksum: str) -> str:
    """``<source stem>-<quant>-<target>-<key>``; the key covers the checksum, the options and llmc's version."""
    key = hashlib.sha256(json.dumps({"llmc": __version__, "source": checksum, "options": options.manifest_dict()},
                                    sort_keys=True, default=str).encode()).hexdigest()[:12]
    stem = path.name[: -len(".gguf")] if path.name.endswith(".gguf") else path.name
    return f"{stem}-{options.quant}-{options.target}-{key}"


def resolve_model(model: str | Path, options: CompileOptions | None = None) -> Path:
    """An artifact for ``model``: ``model`` itself when it is one, else the cached build of the
    GGUF file or Hugging Face folder (compiled now when there is none yet)."""
    path = Path(model)
    if source_kind(path) == "artifact":
        return path
    options = options or default_options(path)
    out = artifacts_dir() / entry_name(path, options, source_checksum(path))
    if is_artifact(out):
        return out
    lock = artifacts_dir() / LOCKS / f"{out.name}.lock"
    with file_lock(lock, waiting=f"waiting for another llmc process compiling {path.name} ..."):
        if is_artifact(out):  # the other process built it while we waited
            return out
        message(f"compiling {path} once for the {options.target} target (--quant {options.quant}) into "
                f"{out}; later runs reuse it")
        with step(f"compiling {path.name}"):
            compile_model(path, out, options)
    return out


@dataclass
class CachedArtifact:
    """One entry of the artifact cache."""

    name: str
    path: Path
    bytes: int
    source: str
    target: str
    quant: str
    created: str

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "path": str(self.path), "bytes": self.bytes, "source": self.source,
                "target": self.target, "quant": self.quant, "created": self.created}


def cached_artifacts() -> list[CachedArtifact]:
    """Every complete build in the cache, by name."""
    root = artifacts_dir()
    entries = []
    for path in sorted(root.iterdir()) if root.is_dir() else []:
        if path.name.startswith(".") or not is_artifact(path):
            continue
        try:
            manifest = json.loads((path / MANIFEST).read_text())
        except (OSError, ValueError):
            continue
        entries.append(CachedArtifact(
            name=path.name, path=path, bytes=sum(int(f.get("bytes", 0)) for f in manifest.get("files", {}).values()),
            source=str(manifest.get("source", {}).get("path", "?")),
            target=str(manifest.get("target", {}).get("name", "?")),
            quant=str(manifest.get("compile_options", {}).get("quant", "?")),
            created=str(manifest.get("created", "?"))))
    return entries


def remove_cached(names: list[str] | None = None) -> list[str]:
    """Remove the named builds (None: the whole cache, unfinished builds included); returns what went."""
    root = artifacts_dir()
    if names is None:
        gone = [p.name for p in sorted(root.iterdir())] if root.is_dir() else []
        shutil.rmtree(root, ignore_errors=True)
        return gone
    known = {e.name for e in cached_artifacts()}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise LlmcError(f"not in the artifact cache ({root}): {', '.join(unknown)}; see `llmc cache ls`")
    for name in names:
        shutil.rmtree(root / name)
        (root / LOCKS / f"{name}.lock").unlink(missing_ok=True)
    return list(names)
