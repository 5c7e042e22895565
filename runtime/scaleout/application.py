"""The Ray Serve application: an ingress deployment (the OpenAI app), one engine deployment per
model (``replicas`` each, routed by prefix affinity) and the metrics hub.

:func:`build_application` returns it, ready for ``serve.run``; :func:`model_spec` reads what the
ingress needs of an artifact (tokenizer, context) without loading its weights.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application

from llmc.compiler.errors import LlmcError
from llmc.runtime.scaleout.config import ScaleOutConfig
from llmc.runtime.scaleout.ingress import ModelSpec, RayBackend
from llmc.runtime.scaleout.metrics_hub import MetricsHub
from llmc.runtime.scaleout.replica import EngineReplica
from llmc.runtime.server.app import create_backend_app
from llmc.runtime.server.limits import ServerLimits

APP_NAME = "llmc"


def model_spec(name: str, artifact: str | Path, max_model_len: int | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of the artifact at ``artifact`` served as ``name``; ``max_model_len``
    is the replicas' engine option of that name (default: the model's context)."""
    from dataclasses import asdict

    from llmc.runtime.artifact import Artifact
    from llmc.runtime.server.backend import require_tokenizer

    art = Artifact.load(artifact, verify=False)  # the replicas verify it when they load it
    tokenizer = require_tokenizer(art.tokenizer(), f"the artifact {artifact}")
    slug = re.sub(r"[^A-Za-z0-9_-]+", "-", name).strip("-") or "model"
    return ModelSpec(name=name, artifact=str(Path(artifact).resolve()), tokenizer_json=tokenizer.tokenizer.to_str(),
                     tokenizer_meta=asdict(tokenizer.meta),
                     max_model_len=int(max_model_len or art.config.max_position),
                     deployment=f"engine-{slug}")


@serve.ingress()
class Ingress:
    """The OpenAI-compatible app (:func:`create_backend_app`) over :class:`RayBackend`."""

    async def __init__(self, specs: list[ModelSpec], engines: dict[str, Any], hub: Any, api_key: str | None,
                       admission_timeout_s: float, limits: ServerLimits | None = None) -> None:
        self.backend = RayBackend(specs, engines, hub, admission_timeout_s)
        self.api_key = api_key
        self.limits = limits

    def __serve_build_asgi_app__(self) -> Any:
        return create_backend_app(self.backend, api_key=self.api_key, limits=self.limits)


def build_application(specs: list[ModelSpec], config: ScaleOutConfig, api_key: str | None = None,
                      limits: ServerLimits | None = None) -> Application:
    """The Serve application serving ``specs`` (names must be unique) under ``config``; ``limits``
    bound what a request may hold in the ingress (body size and time, requests being tokenized)."""
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise LlmcError(f"model names must be unique, got {names}; name them with --served-model-name")
    deployments = [s.deployment for s in specs]
    if len(set(deployments)) != len(deployments):
        raise LlmcError(f"model names {names} map to the same deployment name; rename one (--served-model-name)")
    hub = serve.deployment(MetricsHub, name="metrics-hub", num_replicas=1, ray_actor_options={"num_cpus": 0},
                           max_ongoing_requests=1000).bind(ttl_s=max(5.0, 5 * config.report_interval_s))
    engine_options = config.deployment_options()
    engines = {
        s.name: serve.deployment(EngineReplica, name=s.deployment, **engine_options).bind(
            s.name, s.artifact, config.engine_options, hub, config.report_interval_s)
        for s in specs
    }
    ingress = serve.deployment(Ingress, name="ingress", num_replicas=1, ray_actor_options={"num_cpus": 0},
                               max_ongoing_requests=100_000)
    return ingress.bind(specs, engines, hub, api_key, config.admission_timeout_s, limits)


def app_builder(args: dict[str, Any]) -> Application:
    """The application from a Serve config file (``import_path:
    llmc.runtime.scaleout.application:app_builder``, e.g. in a KubeRay RayService): ``args`` holds
    ``models`` (a list of ``{"name", "artifact"}``), ``api_key`` (else ``$LLMC_API_KEY``) and any
    :class:`ScaleOutConfig` field but ``ray_address`` (``replicas``, ``gpus_per_replica``,
    ``engine_options``, ...). The artifacts must be readable where the application is built and
    where each replica runs (a shared volume)."""
    import os
    from dataclasses import fields

    args = dict(args)
    models = args.pop("models", None)
    if not isinstance(models, list) or not models or not all(isinstance(m, dict) and {"name", "artifact"} <= set(m)
                                                             for m in models):
        raise LlmcError("app_builder args: 'models' must be a non-empty list of {name, artifact}")
    api_key = args.pop("api_key", None) or os.environ.get("LLMC_API_KEY")
    known = {f.name for f in fields(ScaleOutConfig)} - {"ray_address"}
    unknown = sorted(set(args) - known)
    if unknown:
        raise LlmcError(f"app_builder args: unknown key(s) {', '.join(unknown)}; valid: models, api_key, "
                        f"{', '.join(sorted(known))}")
    config = ScaleOutConfig(**args)
    specs = [model_spec(str(m["name"]), str(m["artifact"]), config.engine_options.get("max_model_len"))
             for m in models]
    return build_application(specs, config, api_key)
