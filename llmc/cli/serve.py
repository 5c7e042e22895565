"""``llmc serve``: one model in this process, or (``--replicas``) many replicas and models on Ray Serve."""

from __future__ import annotations

from pathlib import Path

import click

from llmc.cli.common import MODEL_HELP, compile_on_first_use, resolve_model
from llmc.compiler.errors import LlmcError


def _model_name(artifact: Path) -> str:
    return artifact.name[: -len(".gguf")] if artifact.name.endswith(".gguf") else artifact.resolve().name


@click.command()
@click.argument("artifacts", metavar="MODEL [MODEL ...]", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535), help="Port to listen on.")
@click.option("--api-key", envvar="LLMC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $LLMC_API_KEY).")
@click.option("--served-model-name", "served_model_names", multiple=True,
              help="Model id clients send (default: MODEL's file or folder name, without .gguf); once per MODEL.")
@click.option("--max-running", default=32, show_default=True, type=click.IntRange(1), help="Sequences per step.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1),
              help="Sequences held (running + waiting) before requests get 429 (per replica).")
@click.option("--max-num-tokens", default=512, show_default=True, type=click.IntRange(1), help="Token budget per step.")
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads per engine (default: the target's).")
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
@click.option("--replicas", default=None, type=click.IntRange(1),
              help="Run on Ray Serve with this many engine replicas per MODEL (the initial number when autoscaling).")
@click.option("--ray-address", default=None,
              help="With --replicas: join this Ray cluster (e.g. ray://head:10001 or auto) instead of starting a "
                   "local Ray instance.")
@click.option("--gpus-per-replica", default=0.0, show_default=True, type=click.FloatRange(0),
              help="With --replicas: GPUs each replica reserves (1: one replica per GPU).")
@click.option("--cpus-per-replica", default=1.0, show_default=True, type=click.FloatRange(0),
              help="With --replicas: CPUs each replica reserves.")
@click.option("--min-replicas", default=None, type=click.IntRange(0),
              help="With --replicas: autoscale, down to this many replicas per MODEL.")
@click.option("--max-replicas", default=None, type=click.IntRange(1),
              help="With --replicas: autoscale, up to this many replicas per MODEL.")
@click.option("--target-ongoing-requests", default=None, type=click.FloatRange(0, min_open=True),
              help="With autoscaling: requests per replica Serve aims for (default: Ray Serve's).")
@compile_on_first_use
def serve(artifacts: tuple[Path, ...], host: str, port: int, api_key: str | None, served_model_names: tuple[str, ...],
          max_running: int, max_queue: int, max_num_tokens: int, device: str | None, threads: int | None,
          kv_cache_memory: str | None, gpu_memory_utilization: float | None, max_model_len: int | None,
          log_level: str, replicas: int | None, ray_address: str | None, gpus_per_replica: float,
          cpus_per_replica: float, min_replicas: int | None, max_replicas: int | None,
          target_ongoing_requests: float | None, compile_target: str, quant: str | None) -> None:
    """Serve MODEL over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics).

    When the running requests outgrow the KV cache, the newest are preempted and recomputed later
    (never failed); a request longer than the whole cache or --max-model-len is refused.

    With --replicas N, the server runs on Ray Serve: N engine replicas per MODEL behind one
    endpoint, several MODELs routed by the request's "model" (see docs/scale-out.md).

    MODEL_HELP
    """
    scale_out = replicas is not None
    scale_flags = {"--ray-address": ray_address, "--min-replicas": min_replicas, "--max-replicas": max_replicas,
                   "--target-ongoing-requests": target_ongoing_requests, "--gpus-per-replica": gpus_per_replica or None,
                   "--cpus-per-replica": cpus_per_replica if cpus_per_replica != 1.0 else None}
    if not scale_out:
        given = [flag for flag, value in scale_flags.items() if value is not None]
        if given:
            raise LlmcError(f"{', '.join(given)} need(s) --replicas N (the Ray Serve deployment)")
        if len(artifacts) > 1:
            raise LlmcError(f"serving {len(artifacts)} models behind one endpoint needs --replicas N "
                            "(the Ray Serve deployment)")
    if served_model_names and len(served_model_names) != len(artifacts):
        raise LlmcError(f"--served-model-name is given {len(served_model_names)} time(s) for {len(artifacts)} "
                        "MODEL(s); give it once per MODEL, in order, or not at all")
    names = list(served_model_names) or [_model_name(a) for a in artifacts]
    from llmc.compiler.errors import InputError
    from llmc.compiler.options import parse_bytes

    if kv_cache_memory is not None and gpu_memory_utilization is not None:
        raise InputError("give --kv-cache-memory or --gpu-memory-utilization, not both")
    kv_memory = None if kv_cache_memory is None else parse_bytes(kv_cache_memory, "--kv-cache-memory")
    engine_options = {"max_running": max_running, "max_queue": max_queue, "max_num_tokens": max_num_tokens,
                      "device": device, "threads": threads, "kv_memory": kv_memory,
                      "gpu_memory_utilization": gpu_memory_utilization, "max_model_len": max_model_len}
    engine_options = {k: v for k, v in engine_options.items() if v is not None}
    if not scale_out:
        from llmc.runtime.server.serve import check_dependencies
        from llmc.runtime.server.serve import serve as run_server

        check_dependencies()  # before any compile
        path = resolve_model(artifacts[0], compile_target, quant, device)
        run_server(path, host=host, port=port, api_key=api_key, served_model_name=names[0], log_level=log_level,
                   **engine_options)
        return

    from llmc.runtime.scaleout.config import ScaleOutConfig
    from llmc.runtime.scaleout.deploy import check_dependencies as check_ray
    from llmc.runtime.scaleout.deploy import serve_scaleout
    from llmc.runtime.server.serve import check_dependencies

    check_dependencies()
    check_ray()
    config = ScaleOutConfig(replicas=replicas, min_replicas=min_replicas, max_replicas=max_replicas,
                            target_ongoing_requests=target_ongoing_requests, gpus_per_replica=gpus_per_replica,
                            cpus_per_replica=cpus_per_replica, ray_address=ray_address, engine_options=engine_options)
    paths = [resolve_model(a, compile_target, quant, device) for a in artifacts]
    serve_scaleout(list(zip(names, paths, strict=True)), config, host=host, port=port, api_key=api_key,
                   log_level=log_level)


serve.help = (serve.help or "").replace("MODEL_HELP", MODEL_HELP)
