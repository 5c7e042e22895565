"""OpenAI-compatible HTTP server over the llmc engine (``llmc serve``).

``create_app(engine, model_name=...)`` returns the FastAPI app (embed it or mount it);
:func:`llmc.runtime.server.serve.serve` loads an artifact and runs it with uvicorn.
Needs the ``serve`` extra (fastapi, uvicorn, prometheus-client).
"""

from llmc.runtime.server.app import create_app

__all__ = ["create_app"]
