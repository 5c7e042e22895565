"""Where llmc keeps what it builds or downloads once and reuses (one root for every cache)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(cache: str | Path | None = None) -> Path:
    """``cache``, else ``$LLMC_CACHE``, else ``~/.cache/llmc``."""
    if cache is not None:
        return Path(cache)
    env = os.environ.get("LLMC_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "llmc"
