"""``llmc serve``: load an artifact into an engine and serve it over HTTP with uvicorn."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from llmc.compiler.errors import LlmcError

logger = logging.getLogger("llmc.server")


def check_dependencies() -> None:
    """Raise a clear error when the ``serve`` extra is not installed."""
    missing = []
    for module in ("fastapi", "uvicorn", "prometheus_client"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise LlmcError(f"llmc serve needs {', '.join(missing)}", hint="pip install 'llmc-toolchain[serve]'")


def serve(artifact: str | Path, *, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          served_model_name: str | None = None, log_level: str = "info", **engine_config: Any) -> None:
    """Serve ``artifact`` until interrupted (SIGINT/SIGTERM); ``engine_config`` goes to ``Engine.load``."""
    check_dependencies()
    import uvicorn

    from llmc.runtime.engine import Engine
    from llmc.runtime.server.app import create_app

    path = Path(artifact)
    name = served_model_name or path.resolve().name
    engine = Engine.load(str(path), **engine_config)
    try:
        app = create_app(engine, model_name=name, api_key=api_key)
        logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
        kv = engine.kv
        logger.info("serving %s as model %r on http://%s:%d (max_running=%s, max_model_len=%d, kv cache %d blocks "
                    "of %d tokens = %d tokens)", path, name, host, port, engine.engine_config.max_running,
                    engine.max_model_len, kv.num_blocks, kv.block_size, kv.num_blocks * kv.block_size)
        uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    finally:
        engine.close()
