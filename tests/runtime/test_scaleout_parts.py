"""The scale-out pieces without a Ray cluster: the wire format, prefix hashes, the router's
choices, metrics merging, the ingress's fault handling over a fake handle, and the options."""

from __future__ import annotations

import asyncio
import pickle
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

pytest.importorskip("ray.serve", reason="Ray Serve is not installed (pip install 'llmc-toolchain[ray]')")
pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'llmc-toolchain[serve]')")

from prometheus_client.parser import text_string_to_metric_families
from ray.exceptions import ActorDiedError
from ray.serve.exceptions import BackPressureError

from llmc.compiler.errors import LlmcError
from llmc.runtime.errors import ContextLengthError, QueueFullError, TokenIdError
from llmc.runtime.sampling import SamplingParams
from llmc.runtime.scaleout.config import ScaleOutConfig
from llmc.runtime.scaleout.ingress import ModelSpec, RemoteModel, ReplicaError
from llmc.runtime.scaleout.metrics_hub import MetricsHub, Report, merge_metrics
from llmc.runtime.scaleout.router import PrefixAffinityRouter
from llmc.runtime.scaleout.wire import (
    PREFIX_BLOCK_TOKENS,
    Admitted,
    Failed,
    RoutingInfo,
    prefix_hashes,
    refusal_error,
    refused,
)
from llmc.runtime.server.errors import APIError, refusal
from llmc.runtime.server.generation import Delta, Job
from llmc.runtime.server.metrics import ServerMetrics
from llmc.runtime.structured import GrammarError
from tests.models import CHATML_TEMPLATE, byte_level_tokenizer


# -- wire ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [ContextLengthError(4000, 200, 4096), ContextLengthError(4096, None, 4096),
                                 QueueFullError(8), TokenIdError([120, 130], 99),
                                 GrammarError("the regex must be a non-empty string", "guided_regex")])
def test_a_refusal_crosses_the_wire_and_maps_like_the_original(exc: LlmcError) -> None:
    item = pickle.loads(pickle.dumps(refused("r1", exc)))
    rebuilt = refusal_error(item)
    assert type(rebuilt) is type(exc) and str(rebuilt) == str(exc)
    for what in ("prompt", "messages"):
        a, b = refusal(exc, what), refusal(rebuilt, what)
        assert (a.status, a.body(), a.headers) == (b.status, b.body(), b.headers)
    if isinstance(exc, GrammarError):  # a constraint the replica could not compile names its field
        assert refusal(rebuilt, "prompt").body()["error"]["param"] == "guided_regex"


def test_prefix_hashes_are_shared_exactly_by_shared_blocks() -> None:
    b = PREFIX_BLOCK_TOKENS
    base = list(range(5 * b))
    other = base[: 3 * b] + [7] * (2 * b)
    ha, hb = prefix_hashes(base), prefix_hashes(other)
    assert len(ha) == 5 and ha[:3] == hb[:3] and not set(ha[3:]) & set(hb[3:])
    assert prefix_hashes(base[: b - 1]) == []
    assert prefix_hashes([*base, 1]) == ha  # a partial last block is not hashed
    assert prefix_hashes([1, *base])[0] != ha[0]


# -- router --------------------------------------------------------------------------------------
def _replica(rid: str, limit: int = 10) -> Any:
    return SimpleNamespace(replica_id=SimpleNamespace(unique_id=rid), max_ongoing_requests=limit)


def _router(queue: dict[str, int]) -> PrefixAffinityRouter:
    router = PrefixAffinityRouter.__new__(PrefixAffinityRouter)  # no Serve machinery: only the policy
    router._replica_queue_len_cache = SimpleNamespace(get=lambda replica_id: queue.get(replica_id.unique_id))
    router.initialize_state(min_prefix_tokens=2 * PREFIX_BLOCK_TOKENS, imbalance=3)
    return router


def _pending(info: RoutingInfo) -> Any:
    return SimpleNamespace(kwargs={"routing": info}, routing_context=SimpleNamespace(should_backoff=False))


def _choose(router: PrefixAffinityRouter, replicas: list[Any], info: RoutingInfo) -> list[list[str]]:
    ranks = asyncio.run(router.choose_replicas(replicas, _pending(info)))
    return [sorted(r.replica_id.unique_id for r in rank) for rank in ranks]


def test_the_router_prefers_the_replica_holding_the_longest_prefix_unless_it_is_overloaded() -> None:
    queue = {"a": 0, "b": 0}
    router = _router(queue)
    replicas = [_replica("a"), _replica("b")]
    long_prompt = list(range(6 * PREFIX_BLOCK_TOKENS))
    first = RoutingInfo(prefix_hashes(long_prompt))
    assert _choose(router, replicas, first) == [["a", "b"]]  # nothing known: every replica, least loaded wins
    router.on_request_routed(_pending(first), replicas[1].replica_id, None)
    assert first.replica == "b"
    shares_4_blocks = long_prompt[: 4 * PREFIX_BLOCK_TOKENS] + [1] * PREFIX_BLOCK_TOKENS
    assert _choose(router, replicas, RoutingInfo(prefix_hashes(shares_4_blocks))) == [["b"], ["a", "b"]]
    shares_1_block = long_prompt[:PREFIX_BLOCK_TOKENS] + [1] * 3 * PREFIX_BLOCK_TOKENS  # under the threshold
    assert _choose(router, replicas, RoutingInfo(prefix_hashes(shares_1_block))) == [["a", "b"]]
    queue["b"] = 4  # more than `imbalance` above the least loaded: overloaded
    assert _choose(router, replicas, RoutingInfo(prefix_hashes(long_prompt))) == [["a", "b"]]
    queue["b"] = 3
    assert _choose(router, replicas, RoutingInfo(prefix_hashes(long_prompt))) == [["b"], ["a", "b"]]
    # a replica that is gone is never chosen; `avoid` leaves it out unless nothing else is left
    assert _choose(router, [replicas[0]], RoutingInfo(prefix_hashes(long_prompt))) == [["a"]]
    assert _choose(router, replicas, RoutingInfo(prefix_hashes(long_prompt), avoid=["b"])) == [["a"]]
    assert _choose(router, [replicas[1]], RoutingInfo([], avoid=["b"])) == [["b"]]


def test_the_router_forgets_the_least_recently_routed_prefixes() -> None:
    router = _router({})
    router.max_entries = 4
    replicas = [_replica("a")]
    for start in range(3):
        info = RoutingInfo(prefix_hashes(list(range(start * 1000, start * 1000 + 2 * PREFIX_BLOCK_TOKENS))))
        router.on_request_routed(_pending(info), replicas[0].replica_id, None)
    assert len(router._owner) == 4


# -- metrics -------------------------------------------------------------------------------------
def test_metrics_of_every_replica_are_merged_with_replica_labels() -> None:
    a, b = ServerMetrics(lambda: {"running": 3}), ServerMetrics(lambda: {"running": 1})
    a.generation_tokens.inc(5)
    b.generation_tokens.inc(7)
    a.finished.labels(finish_reason="stop").inc()
    own = ServerMetrics(dict)
    own.requests.labels(endpoint="/v1/completions", status="200").inc()
    reports = [Report("m", "r1", a.render().decode(), 0.0), Report("m", "r2", b.render().decode(), 0.0)]
    text = merge_metrics(own.registry, reports).decode()
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))  # one family per name
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}
    assert samples[("llmc_generation_tokens_total", (("model", "m"), ("replica", "r1")))] == 5
    assert samples[("llmc_generation_tokens_total", (("model", "m"), ("replica", "r2")))] == 7
    assert samples[("llmc_num_requests_running", (("model", "m"), ("replica", "r2")))] == 1
    assert samples[("llmc_sequences_finished_total", (("finish_reason", "stop"), ("model", "m"),
                                                      ("replica", "r1")))] == 1
    assert samples[("llmc_http_requests_total", (("endpoint", "/v1/completions"), ("status", "200")))] == 1
    assert not any(n == "llmc_num_requests_running" and "replica" not in dict(lbl) for n, lbl in samples)


def test_the_hub_drops_replicas_that_stopped_reporting(monkeypatch: pytest.MonkeyPatch) -> None:
    now = [100.0]
    monkeypatch.setattr("llmc.runtime.scaleout.metrics_hub.time.monotonic", lambda: now[0])
    hub = MetricsHub(ttl_s=5)
    hub.report("m", "r1", "")
    now[0] += 3
    hub.report("m", "r2", "")
    now[0] += 3
    assert [r.replica for r in hub.snapshot()] == ["r2"]


# -- the ingress over a fake handle --------------------------------------------------------------
class _Stream:
    """A fake DeploymentResponseGenerator: yields ``items``; an exception item is raised; ``hang`` waits forever."""

    def __init__(self, items: list[Any]) -> None:
        self.items = list(items)
        self.cancelled = False

    async def __anext__(self) -> Any:
        if not self.items:
            raise StopAsyncIteration
        item = self.items.pop(0)
        if item == "hang":
            await asyncio.sleep(3600)
        if isinstance(item, BaseException):
            raise item
        return item

    def cancel(self) -> None:
        self.cancelled = True


class _Handle:
    """Hands out one scripted stream per call; the router's pick is written into ``routing.replica``."""

    def __init__(self, *scripts: tuple[str, list[Any]]) -> None:
        self.scripts = list(scripts)
        self.calls: list[RoutingInfo] = []

    def options(self, **_: Any) -> _Handle:
        return self

    def remote(self, jobs: list[Job], request_id: str, arrival: float, routing: RoutingInfo) -> _Stream:
        replica, items = self.scripts.pop(0)
        routing.replica = replica
        self.calls.append(RoutingInfo(list(routing.prefix_hashes), list(routing.avoid), replica))
        return _Stream(items)


def _model(handle: _Handle, timeout: float = 5.0) -> RemoteModel:
    tok = byte_level_tokenizer(99, printable_only=True)
    spec = ModelSpec("m", "/nowhere", tok.to_str(), {"eos_token_ids": [2], "chat_template": CHATML_TEMPLATE}, 128,
                     "engine-m")
    return RemoteModel(spec, handle, timeout)


JOBS = [Job(0, list(range(40)), SamplingParams(max_tokens=2))]
DELTAS = [[(0, Delta("a", [5]))], [(0, Delta("b", [6], finish_reason="length"))]]


def _run(handle: _Handle, how: str, timeout: float = 5.0) -> Any:
    async def main() -> Any:
        run = _model(handle, timeout).new_run(JOBS, "req-1", 0.0)
        try:
            await run.start()
            if how == "collect":
                return run, await run.collect()
            return run, [d async for d in run.deltas()]
        finally:
            await run.close()

    return asyncio.run(main())


def test_a_request_streams_from_the_replica_that_admitted_it() -> None:
    run, deltas = _run(_Handle(("r1", [Admitted("r1"), *DELTAS])), "deltas")
    assert run.headers == {"x-llmc-replica": "r1"} and [d.text for _, d in deltas] == ["a", "b"]
    run, results = _run(_Handle(("r1", [Admitted("r1"), *DELTAS])), "collect")
    assert results[0].text == "ab" and results[0].finish_reason == "length"


def test_a_full_deployment_is_a_429_and_no_replica_in_time_a_503_both_with_retry_after() -> None:
    with pytest.raises(APIError) as full:
        _run(_Handle(("r1", [BackPressureError(num_queued_requests=4, max_queued_requests=4)])), "collect")
    assert full.value.status == 429 and full.value.headers == {"retry-after": "1"}
    handle = _Handle(("r1", ["hang"]))
    with pytest.raises(APIError) as late:
        _run(handle, "collect", timeout=0.2)
    assert late.value.status == 503 and late.value.headers == {"retry-after": "1"}
    assert late.value.code == "no_replica_available"


def test_an_engine_refusal_is_the_typed_error_with_the_replica_header() -> None:
    async def main() -> None:
        run = _model(_Handle(("r2", [refused("r2", QueueFullError(8))]))).new_run(JOBS, "req-1", 0.0)
        with pytest.raises(QueueFullError):
            await run.start()
        assert run.headers == {"x-llmc-replica": "r2"}

    asyncio.run(main())


def test_a_replica_dying_before_admission_or_under_a_non_streamed_request_is_retried_once_elsewhere() -> None:
    handle = _Handle(("r1", [ActorDiedError()]), ("r2", [Admitted("r2"), *DELTAS]))
    run, results = _run(handle, "collect")
    assert results[0].text == "ab" and run.headers["x-llmc-replica"] == "r2"
    assert handle.calls[1].avoid == ["r1"]
    handle = _Handle(("r1", [Admitted("r1"), DELTAS[0], ActorDiedError()]), ("r2", [Admitted("r2"), *DELTAS]))
    run, results = _run(handle, "collect")
    assert results[0].text == "ab" and results[0].token_ids == [5, 6]  # the partial first try is dropped
    assert handle.calls[1].avoid == ["r1"] and run.headers["x-llmc-replica"] == "r2"
    handle = _Handle(("r1", [Admitted("r1"), ActorDiedError()]), ("r2", [Admitted("r2"), ActorDiedError()]))
    with pytest.raises(APIError) as twice:
        _run(handle, "collect")
    assert twice.value.status == 503 and twice.value.code == "replica_failed"


def test_a_replica_dying_mid_stream_ends_it_with_a_replica_failed_error() -> None:
    handle = _Handle(("r1", [Admitted("r1"), DELTAS[0], ActorDiedError()]))
    with pytest.raises(APIError) as lost:
        _run(handle, "deltas")
    assert lost.value.code == "replica_failed" and "r1" in lost.value.message
    assert len(handle.calls) == 1  # a stream already under way is not replayed


def test_a_failure_on_the_replica_is_a_replica_error() -> None:
    with pytest.raises(ReplicaError, match="RuntimeError: boom"):
        _run(_Handle(("r1", [Admitted("r1"), Failed("r1", "RuntimeError: boom")])), "collect")


# -- options -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"replicas": 0}, "--replicas"),
    ({"replicas": 3, "max_replicas": 2}, "between"),
    ({"replicas": 1, "min_replicas": 2, "max_replicas": 1}, "--max-replicas"),
    ({"target_ongoing_requests": 0}, "--target-ongoing-requests"),
    ({"cpus_per_replica": -1}, "must not be negative"),
])
def test_bad_scale_out_options_are_refused(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(LlmcError, match=message):
        ScaleOutConfig(**kwargs)


def test_deployment_options() -> None:
    fixed = ScaleOutConfig(replicas=3, gpus_per_replica=1, engine_options={"max_queue": 64}).deployment_options()
    assert fixed["num_replicas"] == 3 and "autoscaling_config" not in fixed
    assert fixed["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 1}
    assert fixed["max_ongoing_requests"] == 64 and fixed["max_queued_requests"] == 64
    assert fixed["request_router_config"].request_router_class == "llmc.runtime.scaleout.router.PrefixAffinityRouter"
    auto = ScaleOutConfig(replicas=2, min_replicas=1, max_replicas=4, target_ongoing_requests=16).deployment_options()
    assert auto["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "initial_replicas": 2,
                                          "target_ongoing_requests": 16}
    assert "num_replicas" not in auto


def test_the_config_file_builder_makes_the_application(chat_model: tuple[Path, Path]) -> None:
    from ray.serve import Application

    from llmc.runtime.scaleout.application import app_builder

    args = {"models": [{"name": "a", "artifact": str(chat_model[1])}], "replicas": 2, "cpus_per_replica": 0.5}
    assert isinstance(app_builder(args), Application)
    with pytest.raises(LlmcError, match="unknown key"):
        app_builder({**args, "replica": 2})
    with pytest.raises(LlmcError, match="'models' must be"):
        app_builder({"replicas": 2})
    with pytest.raises(LlmcError, match="must be unique"):
        app_builder({"models": [{"name": "a", "artifact": str(chat_model[1])}] * 2})
