"""``llmc serve``."""

from __future__ import annotations

from pathlib import Path

import click

from llmc.cli.common import MODEL_HELP, compile_on_first_use, resolve_model


@click.command()
@click.argument("artifact", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--api-key", envvar="LLMC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $LLMC_API_KEY).")
@click.option("--served-model-name", default=None,
              help="Model id clients send (default: MODEL's file or folder name, without .gguf).")
@click.option("--max-running", default=32, show_default=True, type=click.IntRange(1), help="Sequences per step.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1),
              help="Sequences held (running + waiting) before requests get 429.")
@click.option("--max-num-tokens", default=512, show_default=True, type=click.IntRange(1), help="Token budget per step.")
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="Server log detail.")
@compile_on_first_use
def serve(artifact: Path, host: str, port: int, api_key: str | None, served_model_name: str | None, max_running: int,
          max_queue: int, max_num_tokens: int, device: str | None, log_level: str, compile_target: str,
          quant: str | None) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics).

    MODEL_HELP
    """
    from llmc.runtime.server.serve import check_dependencies
    from llmc.runtime.server.serve import serve as run_server

    check_dependencies()  # before any compile
    name = served_model_name or (artifact.name[: -len(".gguf")] if artifact.name.endswith(".gguf") else
                                 artifact.resolve().name)
    path = resolve_model(artifact, compile_target, quant, device)
    run_server(path, host=host, port=port, api_key=api_key, served_model_name=name,
               log_level=log_level, max_running=max_running, max_queue=max_queue, max_num_tokens=max_num_tokens,
               device=device)


serve.help = (serve.help or "").replace("MODEL_HELP", MODEL_HELP)


