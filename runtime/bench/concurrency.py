"""Concurrent requests through llmc's continuous-batching :class:`~llmc.runtime.engine.Engine`."""

from __future__ import annotations

from typing import Any

from llmc.compiler.errors import LlmcError
from llmc.runtime.bench.backends import RequestRun


def run_engine_requests(engine: Any, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
    """Submit every prompt at once (greedy, EOS ignored) and time each from its submission."""
    from llmc.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=gen_len, temperature=0.0, ignore_eos=True)
    outputs = engine.generate([list(p) for p in prompts], params)
    runs = []
    for out in outputs:
        if out.finish_reason == "cancelled":
            raise LlmcError(f"engine request {out.request_id} was cancelled during the benchmark")
        runs.append(RequestRun(float(out.timings["ttft_s"]), float(out.timings["total_s"]), len(out.token_ids),
                               list(out.token_ids)))
    return runs
