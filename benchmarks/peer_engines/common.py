"""What every peer backend shares: package versions and concurrency as one static batch."""

from __future__ import annotations

from importlib import metadata

from llmc.runtime.bench import Backend, RequestRun


def package_version(package: str) -> str | None:
    """The installed version of ``package`` (None when it is not installed)."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


class StaticBatchBackend(Backend):
    """A peer without a request queue: concurrent requests all arrive at once and run as one
    static batch (for llama.cpp this is exactly its parallel-slot decoding), so each request's
    TTFT is the batch's prefill time and its latency the batch's total."""

    def run_concurrent(self, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
        run = self.run_batch(prompts, gen_len)
        ids = run.token_ids or [None] * len(prompts)
        return [RequestRun(run.prefill_s, run.total_s, gen_len, t) for t in ids]
