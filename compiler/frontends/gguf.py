"""GGUF files (llama.cpp's format, v2/v3): the front end that composes the reader
(:mod:`.gguf_reader`), the metadata -> config mapping (:mod:`.gguf_config`) and the tensors
(:mod:`.gguf_tensors`) into a :class:`ModelSource`.
"""

from __future__ import annotations

from pathlib import Path

from llmc.compiler.frontends.gguf_config import parse_config
from llmc.compiler.frontends.gguf_reader import Metadata, open_gguf
from llmc.compiler.frontends.gguf_tensors import load_weights
from llmc.compiler.frontends.source import ModelSource


def load_gguf(path: str | Path, native_quant: bool = False) -> ModelSource:
    """Load a GGUF ``llama`` model; ``native_quant`` keeps quantized blocks as stored."""
    from llmc.compiler.frontends.gguf_tokenizer import build_tokenizer

    path = Path(path)
    reader = open_gguf(path)
    meta = Metadata(reader, path)
    config = parse_config(meta, reader)
    weights = load_weights(reader, path, native_quant)
    tokenizer = build_tokenizer(meta, config) if "tokenizer.ggml.model" in meta else None
    name = meta.get("general.name")
    return ModelSource(
        kind="gguf",
        path=path,
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        files=[path],
        meta={"gguf.name": str(name)} if name else {},
    )
