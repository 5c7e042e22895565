"""What every front end hands to the compiler driver."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import InputError
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.compiler.weights import WeightStore


@dataclass
class ModelSource:
    """A loaded model: config, canonical-named weights, tokenizer and the files read."""

    kind: str
    path: Path
    config: ModelConfig
    weights: WeightStore
    tokenizer: LlmcTokenizer | None
    files: list[Path] = field(default_factory=list)
    meta: dict[str, str] = field(default_factory=dict)


def load_source(path: str | Path, native_quant: bool = False) -> ModelSource:
    """Load a model from a Hugging Face folder or a ``.gguf`` file.

    ``native_quant`` keeps a GGUF's quantized blocks as stored (else they are dequantized).
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such file or directory")
    if path.is_dir():
        from llmc.compiler.frontends.hf import load_hf_folder

        return load_hf_folder(path)
    if is_gguf_file(path):
        from llmc.compiler.frontends.gguf import load_gguf

        return load_gguf(path, native_quant=native_quant)
    raise InputError(f"{path}: not a model folder or a GGUF file")


def is_gguf_file(path: str | Path) -> bool:
    """Whether ``path`` is a file named ``*.gguf`` or starting with the GGUF magic."""
    path = Path(path)
    if not path.is_file():
        return False
    if path.suffix == ".gguf":
        return True
    with path.open("rb") as f:
        return f.read(4) == b"GGUF"
