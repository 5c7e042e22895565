"""``llmc serve ART [ART ...] --replicas N``: start (or join) Ray, run the application on Ray
Serve's HTTP proxy, serve until SIGINT/SIGTERM, then take it down.

Without ``ray_address`` a local Ray instance is started for the server and stopped with it; with
one, the application joins that cluster and only the application is deleted at exit (Serve and
the cluster keep running).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from pathlib import Path
from typing import Any

from llmc.compiler.errors import LlmcError
from llmc.compiler.version import install_hint

logger = logging.getLogger("llmc.scaleout")

NAMESPACE = "llmc"


def check_dependencies() -> None:
    """Raise a clear error when Ray Serve is not installed."""
    try:
        import ray  # noqa: F401
        from ray import serve  # noqa: F401
    except ImportError as exc:
        raise LlmcError(f"llmc serve --replicas runs on Ray Serve, which is not installed ({exc})",
                        hint=install_hint("ray")) from exc


def _check_resources(config: Any, models: int) -> None:
    """Refuse a deployment that cannot start on the cluster's resources (rather than wait forever)."""
    import ray

    total = ray.cluster_resources()
    cpus, gpus = float(total.get("CPU", 0)), float(total.get("GPU", 0))
    need_cpu, need_gpu = config.cpus_needed(models), config.gpus_needed(models)
    if need_gpu > gpus:
        raise LlmcError(f"{models} model(s) x {config.replicas} replica(s) x {config.gpus_per_replica:g} GPU need "
                        f"{need_gpu:g} GPUs; the Ray cluster has {gpus:g}", hint="lower --replicas or "
                        "--gpus-per-replica, or add GPU nodes")
    if need_cpu > cpus:
        raise LlmcError(f"{models} model(s) x {config.replicas} replica(s) x {config.cpus_per_replica:g} CPU need "
                        f"{need_cpu:g} CPUs; the Ray cluster has {cpus:g}",
                        hint="lower --replicas or --cpus-per-replica (e.g. 0.5), or add nodes")


def serve_scaleout(models: list[tuple[str, str | Path]], config: Any, *, host: str = "127.0.0.1", port: int = 8000,
                   api_key: str | None = None, log_level: str = "info", ready: threading.Event | None = None,
                   stop: threading.Event | None = None, limits: Any = None) -> None:
    """Serve ``models`` ((name, artifact) pairs) on Ray Serve until SIGINT/SIGTERM or ``stop``;
    ``limits`` (a :class:`~llmc.runtime.server.limits.ServerLimits`) bound request bodies and the work
    in the ingress, and set Ray's HTTP keep-alive timeout (Ray's proxy owns the connections, so the
    header deadline of the single-process server does not apply)."""
    check_dependencies()
    import ray
    from ray import serve

    from llmc.runtime.scaleout.application import APP_NAME, build_application, model_spec

    logging.basicConfig(level=log_level.upper(), format="%(levelname)s:     %(name)s: %(message)s")
    specs = [model_spec(name, path, config.engine_options.get("max_model_len")) for name, path in models]
    app = build_application(specs, config, api_key, limits)
    local = config.ray_address is None
    os.environ.setdefault("RAY_SERVE_LOG_TO_STDERR", "0")
    ray.init(address="local" if local else config.ray_address, namespace=NAMESPACE, include_dashboard=False,
             logging_level=logging.WARNING, log_to_driver=log_level == "debug", configure_logging=False)
    stop = stop or threading.Event()
    previous = {s: signal.signal(s, lambda *_: stop.set()) for s in (signal.SIGINT, signal.SIGTERM)} \
        if threading.current_thread() is threading.main_thread() else {}
    try:
        _check_resources(config, len(specs))
        http_options: dict[str, Any] = {"host": host, "port": port}
        if limits is not None:
            http_options["keep_alive_timeout_s"] = limits.keep_alive_timeout
        serve.start(http_options=http_options)
        serve.run(app, name=APP_NAME, route_prefix="/")
        logger.info("serving %s on http://%s:%d (%d replica(s) per model, Ray %s)",
                    ", ".join(f"{s.name} ({s.artifact})" for s in specs), host, port, config.replicas,
                    "local" if local else config.ray_address)
        if ready is not None:
            ready.set()
        stop.wait()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        if not local:  # a local instance goes down whole with ray.shutdown(), replicas and all
            try:
                serve.delete(APP_NAME)
            except Exception as exc:
                logger.warning("could not delete the application %r from the cluster: %s", APP_NAME, exc)
        ray.shutdown()
