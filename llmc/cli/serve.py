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
@click.option("--kv-cache-memory", default=None,
              help="KV cache size, e.g. 6GiB or 512MiB (default: --max-running sequences of --max-model-len "
                   "tokens, at most 1 GiB).")
@click.option("--gpu-memory-utilization", default=None, type=click.FloatRange(0, 1, min_open=True),
              help="Fraction of the GPU's memory this server may use: the KV cache gets what the weights and "
                   "a step's activations leave of it (GPU devices only).")
@click.option("--max-model-len", default=None, type=click.IntRange(1),
              help="Longest prompt + output a request may have (default: the model's context); also what the "
                   "default KV cache is sized for.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]), help="Server log detail.")
@compile_on_first_use
def serve(artifact: Path, host: str, port: int, api_key: str | None, served_model_name: str | None, max_running: int,
          max_queue: int, max_num_tokens: int, device: str | None, kv_cache_memory: str | None,
          gpu_memory_utilization: float | None, max_model_len: int | None, log_level: str, compile_target: str,
          quant: str | None) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics).

    When the running requests outgrow the KV cache, the newest are preempted and recomputed later
    (never failed); a request longer than the whole cache or --max-model-len is refused.

    MODEL_HELP
    """
    from llmc.compiler.errors import InputError
    from llmc.compiler.options import parse_bytes
    from llmc.runtime.server.serve import check_dependencies

    if kv_cache_memory is not None and gpu_memory_utilization is not None:
        raise InputError("give --kv-cache-memory or --gpu-memory-utilization, not both")
    kv_memory = None if kv_cache_memory is None else parse_bytes(kv_cache_memory, "--kv-cache-memory")
    from llmc.runtime.server.serve import serve as run_server

    check_dependencies()  # before any compile
    name = served_model_name or (artifact.name[: -len(".gguf")] if artifact.name.endswith(".gguf") else
                                 artifact.resolve().name)
    path = resolve_model(artifact, compile_target, quant, device)
    run_server(path, host=host, port=port, api_key=api_key, served_model_name=name,
               log_level=log_level, max_running=max_running, max_queue=max_queue, max_num_tokens=max_num_tokens,
               device=device, kv_memory=kv_memory, gpu_memory_utilization=gpu_memory_utilization,
               max_model_len=max_model_len)


serve.help = (serve.help or "").replace("MODEL_HELP", MODEL_HELP)


