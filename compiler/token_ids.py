"""Reading token ids from files: a JSON list of ids, or a text the model's tokenizer encodes.

One reader for every place that takes such a file: calibration and evaluation texts at compile
time, ``quantize(calib=...)`` in pipelines and ``llmc eval --ids-file``.
"""

from __future__ import annotations

import json
from pathlib import Path

from llmc.compiler.errors import LlmcError
from llmc.compiler.tokenizer import LlmcTokenizer


def parse_token_ids(text: str, source: str) -> list[int]:
    """The ids of a JSON list; ``source`` names where the text came from in errors."""
    try:
        ids = json.loads(text)
    except json.JSONDecodeError as exc:
        raise LlmcError(f"{source}: not a valid JSON list of token ids: {exc}") from exc
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise LlmcError(f"{source}: expected a JSON list of integer token ids")
    return ids


def _read(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise LlmcError(f"{what} {path}: {exc}") from exc


def read_token_ids(path: str | Path, what: str = "token id file") -> list[int]:
    """Token ids from a file holding a JSON list of integers."""
    return parse_token_ids(_read(path, what), f"{what} {path}")


def read_tokens(path: str | Path, tokenizer: LlmcTokenizer | None, what: str, min_tokens: int = 2) -> list[int]:
    """Token ids of a file: a JSON list of ids (when it starts with ``[``), else its text encoded with
    ``tokenizer``; at least ``min_tokens`` of them."""
    text = _read(path, what)
    if text.strip().startswith("["):
        return parse_token_ids(text, f"{what} {path}")
    if tokenizer is None:
        raise LlmcError(f"{what} {path}: the model has no tokenizer; give a JSON list of token ids instead")
    ids = tokenizer.encode(text)
    if len(ids) < min_tokens:
        raise LlmcError(f"{what} {path}: only {len(ids)} tokens; need a longer text")
    return ids
