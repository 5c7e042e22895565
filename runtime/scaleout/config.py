"""Options of a scale-out deployment (``llmc serve --replicas N ...``), checked before Ray starts."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from llmc.compiler.errors import LlmcError
from llmc.runtime.scaleout.wire import DEFAULT_IMBALANCE, DEFAULT_MIN_PREFIX_TOKENS


@dataclass
class ScaleOutConfig:
    """Replicas per model, their placement and autoscaling, and the fault limits.

    ``replicas`` is the number of engine replicas per model (the initial number when autoscaling).
    Autoscaling is on when ``min_replicas`` or ``max_replicas`` is set: Serve keeps about
    ``target_ongoing_requests`` requests on each replica. ``gpus_per_replica`` and
    ``cpus_per_replica`` are the Ray resources each replica reserves (``gpus_per_replica=1``: one
    replica per GPU). ``max_ongoing_requests`` is what Serve sends one replica at most (default:
    the engine's ``max_queue``), ``max_queued_requests`` what waits in the ingress beyond that
    before 429s (default: as many again).
    """

    replicas: int = 1
    min_replicas: int | None = None
    max_replicas: int | None = None
    target_ongoing_requests: float | None = None
    gpus_per_replica: float = 0.0
    cpus_per_replica: float = 1.0
    ray_address: str | None = None
    max_ongoing_requests: int | None = None
    max_queued_requests: int | None = None
    admission_timeout_s: float = 60.0
    report_interval_s: float = 1.0
    min_prefix_tokens: int = DEFAULT_MIN_PREFIX_TOKENS
    imbalance: int = DEFAULT_IMBALANCE
    engine_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.replicas < 1:
            raise LlmcError(f"--replicas must be at least 1, got {self.replicas}")
        if self.min_replicas is not None and self.min_replicas < 0:
            raise LlmcError(f"--min-replicas must be at least 0, got {self.min_replicas}")
        if self.max_replicas is not None and self.max_replicas < max(1, self.min_replicas or 0):
            raise LlmcError(f"--max-replicas ({self.max_replicas}) must be at least 1 and at least --min-replicas "
                            f"({self.min_replicas})")
        if self.autoscaling and not self.min_bound <= self.replicas <= self.max_bound:
            raise LlmcError(f"--replicas ({self.replicas}) must lie between --min-replicas ({self.min_bound}) and "
                            f"--max-replicas ({self.max_bound})")
        if self.target_ongoing_requests is not None and self.target_ongoing_requests <= 0:
            raise LlmcError(f"--target-ongoing-requests must be positive, got {self.target_ongoing_requests}")
        if self.gpus_per_replica < 0 or self.cpus_per_replica < 0:
            raise LlmcError("--gpus-per-replica and --cpus-per-replica must not be negative")
        if self.admission_timeout_s <= 0:
            raise LlmcError(f"admission_timeout_s must be positive, got {self.admission_timeout_s}")

    @property
    def autoscaling(self) -> bool:
        return self.min_replicas is not None or self.max_replicas is not None

    @property
    def min_bound(self) -> int:
        return self.min_replicas if self.min_replicas is not None else 1

    @property
    def max_bound(self) -> int:
        return self.max_replicas if self.max_replicas is not None else max(self.replicas, self.min_bound)

    def ongoing_limit(self) -> int:
        return self.max_ongoing_requests or int(self.engine_options.get("max_queue") or 256)

    def deployment_options(self) -> dict[str, Any]:
        """Serve deployment options of one model's engine replicas (router, placement, scaling)."""
        from ray.serve.config import RequestRouterConfig

        from llmc.runtime.scaleout.router import PrefixAffinityRouter

        limit = self.ongoing_limit()
        options: dict[str, Any] = {
            "ray_actor_options": {"num_cpus": self.cpus_per_replica, "num_gpus": self.gpus_per_replica},
            "max_ongoing_requests": limit,
            "max_queued_requests": self.max_queued_requests if self.max_queued_requests is not None else limit,
            "request_router_config": RequestRouterConfig(
                request_router_class=PrefixAffinityRouter,
                request_router_kwargs={"min_prefix_tokens": self.min_prefix_tokens, "imbalance": self.imbalance}),
            "health_check_period_s": 5,
            "graceful_shutdown_timeout_s": 5,
        }
        if self.autoscaling:
            auto: dict[str, Any] = {"min_replicas": self.min_bound, "max_replicas": self.max_bound,
                                    "initial_replicas": self.replicas}
            if self.target_ongoing_requests is not None:
                auto["target_ongoing_requests"] = self.target_ongoing_requests
            options["autoscaling_config"] = auto
        else:
            options["num_replicas"] = self.replicas
        return options

    def cpus_needed(self, models: int) -> float:
        """CPUs the engine replicas reserve at the start (the ingress and the hub reserve none)."""
        return models * self.replicas * self.cpus_per_replica

    def gpus_needed(self, models: int) -> float:
        return models * self.replicas * self.gpus_per_replica
