#!/usr/bin/env python
"""Load an OpenAI-compatible HTTP server with concurrent streaming clients (the official ``openai``
client), sweep the concurrency, and write a report in the bench schema (docs/bench_schema.md).

    python benchmarks/http_load.py --base-url http://127.0.0.1:8000/v1 --model smol \\
        --vocab-size 49152 --concurrency 1,8,32 --prompt-len 128 --gen-len 128 --json http.json

Works against any server that speaks the API: ``llmc serve``, ``llama-server -np N`` (llama.cpp),
vLLM. Each point sends ``C`` requests at the same moment, one per client, to
``/v1/completions`` with a prompt of ``--prompt-len`` seeded random token ids (the API accepts a
list of ids, so every server sees the same prompt tokens whatever its tokenizer) and
``max_tokens = --gen-len``, streamed, with ``ignore_eos`` so that every request makes exactly
``--gen-len`` tokens (``--no-ignore-eos`` for servers that refuse the field). A request's TTFT is
the time to its first streamed token, its TPOT ``(e2e - TTFT) / (tokens - 1)``; tokens are counted
from the server's ``usage`` (``stream_options.include_usage``), else one per content chunk.
Rows are ``scenario: concurrency``, ``size: C``; failed requests are counted in the row's
``error`` (the point fails when any request fails, so a report never hides errors).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

from llmc.runtime.bench import (
    Backend,
    BackendInfo,
    BatchRun,
    BenchSettings,
    RequestRun,
    markdown_table,
    new_report,
    parse_sizes,
    progress_bar,
    validate,
    write_outputs,
)
from llmc.runtime.bench.harness import run_backend


@dataclass
class HttpTarget:
    """Where the load goes and how requests are shaped."""

    base_url: str
    model: str
    api_key: str = "unused"
    ignore_eos: bool = True
    timeout_s: float = 600.0
    label: str | None = None


class RequestFailed(RuntimeError):
    """Some requests of a point failed (the message counts them and quotes the first)."""


def engine_decode_counters(base_url: str) -> tuple[float, float] | None:
    """(decode steps, seconds in the executor) from the server's /metrics, summed over its engines (a
    scale-out server labels each replica's), if it exports llmc's engine counters (``llmc serve``;
    other servers, or no prometheus_client here: None)."""
    import httpx

    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return None
    root = base_url.rstrip("/").removesuffix("/v1")
    try:
        response = httpx.get(f"{root}/metrics", timeout=10.0)
    except httpx.HTTPError:
        return None
    if response.status_code != 200:
        return None
    text = response.text
    totals = {"llmc_engine_steps_total": 0.0, "llmc_engine_executor_seconds_total": 0.0}
    found = False
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in totals and sample.labels.get("kind") == "decode":
                    totals[sample.name] += sample.value
                    found = True
    except ValueError:  # not Prometheus text (another server's page)
        return None
    return (totals["llmc_engine_steps_total"], totals["llmc_engine_executor_seconds_total"]) if found else None


class HttpBackend(Backend):
    """An OpenAI-compatible server under load: ``run_concurrent`` sends one streamed request per prompt.
    Against ``llmc serve`` it also sums, per concurrency, the engine's decode steps and their time in the
    executor over the runs (``decode_steps``: concurrency -> [steps, seconds]); against any server, this
    client's own CPU time and streamed chunks (``client_cpu``: concurrency -> [CPU seconds, chunks, wall
    seconds]), since a client on the server's machine takes that CPU from it."""

    def __init__(self, target: HttpTarget) -> None:
        self.target = target
        self.decode_steps: dict[int, list[float]] = {}
        self.client_cpu: dict[int, list[float]] = {}
        self._chunks = 0

    def info(self) -> BackendInfo:
        return BackendInfo(engine="http", label=self.target.label or f"http:{self.target.model}", version=None,
                           weight_bytes=0, weight_bytes_per_step=0, device="server",
                           details={"base_url": self.target.base_url, "model": self.target.model,
                                    "ignore_eos": self.target.ignore_eos})

    def run_batch(self, prompts: list[list[int]], gen_len: int) -> BatchRun:
        raise NotImplementedError("an HTTP server has no static-batch mode; use --scenario concurrency")

    def run_concurrent(self, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
        before = engine_decode_counters(self.target.base_url)
        cpu0, wall0, chunks0 = time.process_time(), time.perf_counter(), self._chunks
        runs = asyncio.run(self._run_all(prompts, gen_len))
        cpu = self.client_cpu.setdefault(len(prompts), [0.0, 0.0, 0.0])
        cpu[0] += time.process_time() - cpu0
        cpu[1] += self._chunks - chunks0
        cpu[2] += time.perf_counter() - wall0
        after = engine_decode_counters(self.target.base_url) if before is not None else None
        if before is not None and after is not None:
            total = self.decode_steps.setdefault(len(prompts), [0.0, 0.0])
            total[0] += after[0] - before[0]
            total[1] += after[1] - before[1]
        return runs

    def step_notes(self) -> list[str]:
        """One note per concurrency: the engine's mean decode step under that load (llmc serve only)."""
        return [f"{self.info().label}, concurrency {c}: the engine's decode steps took {seconds / steps * 1e3:.2f} ms "
                f"on average in the executor ({int(steps)} steps, /metrics; TPOT adds the rest of the server's "
                f"work and the machine's)" for c, (steps, seconds) in sorted(self.decode_steps.items()) if steps]

    def client_notes(self) -> list[str]:
        """One note per concurrency: the CPU this load client used per streamed chunk and in cores."""
        return [f"{self.info().label}, concurrency {c}: the load client used {cpu / chunks * 1e3:.3f} ms of CPU per "
                f"streamed chunk, {cpu / wall:.2f} cores over the runs (its process: parsing, the openai client, "
                f"asyncio)" for c, (cpu, chunks, wall) in sorted(self.client_cpu.items()) if chunks and wall > 0]

    async def _run_all(self, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
        from openai import AsyncOpenAI

        client = AsyncOpenAI(base_url=self.target.base_url, api_key=self.target.api_key,
                             timeout=self.target.timeout_s, max_retries=0)
        try:
            start = time.perf_counter()
            results = await asyncio.gather(*(self._one(client, p, gen_len, start) for p in prompts),
                                           return_exceptions=True)
        finally:
            await client.close()
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            first = failures[0]
            raise RequestFailed(f"{len(failures)} of {len(prompts)} requests failed; first: "
                                f"{type(first).__name__}: {first}")
        return [r for r in results if isinstance(r, RequestRun)]

    async def _one(self, client: Any, prompt: list[int], gen_len: int, start: float) -> RequestRun:
        extra = {"ignore_eos": True} if self.target.ignore_eos else {}
        stream = await client.completions.create(
            model=self.target.model, prompt=prompt, max_tokens=gen_len, temperature=0.0, stream=True,
            stream_options={"include_usage": True}, extra_body=extra)
        first: float | None = None
        chunks = 0
        usage_tokens: int | None = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage_tokens = int(chunk.usage.completion_tokens)
            if chunk.choices and chunk.choices[0].text:
                chunks += 1
                self._chunks += 1
                if first is None:
                    first = time.perf_counter()
        end = time.perf_counter()
        tokens = usage_tokens if usage_tokens is not None else chunks
        if first is None or tokens == 0:
            raise RequestFailed("the stream ended without any token")
        return RequestRun(ttft_s=first - start, e2e_s=end - start, output_tokens=tokens)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-url", required=True, help="The server's API root, e.g. http://127.0.0.1:8000/v1.")
    parser.add_argument("--model", required=True, help="Model id to send (see the server's /v1/models).")
    parser.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY", "unused"), help="Bearer key.")
    parser.add_argument("--vocab-size", type=int, required=True,
                        help="Vocabulary size of the served model (prompt ids are drawn from its ordinary tokens).")
    parser.add_argument("--label", default=None, help="Name of this server in tables and plots.")
    parser.add_argument("--concurrency", default="1,8,32", help="Concurrent clients per point.")
    parser.add_argument("--prompt-len", type=int, default=128, help="Prompt tokens per request.")
    parser.add_argument("--gen-len", type=int, default=128, help="Tokens generated per request.")
    parser.add_argument("--warmup", type=int, default=1, help="Untimed runs per point.")
    parser.add_argument("--repeat", type=int, default=3, help="Timed runs per point.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the random prompts.")
    parser.add_argument("--no-ignore-eos", action="store_true", help="Do not send ignore_eos (outputs may be shorter).")
    parser.add_argument("--timeout", type=float, default=600.0, help="Per-request timeout in seconds.")
    parser.add_argument("--json", dest="json_out", help="Write the report here.")
    parser.add_argument("--plot", dest="plot_out", help="Write a PNG plot here.")
    parser.add_argument("--quiet", action="store_true", help="No progress bar.")
    args = parser.parse_args(argv)
    settings = BenchSettings(scenarios=("concurrency",), concurrency=parse_sizes(args.concurrency, "--concurrency"),
                             prompt_len=args.prompt_len, gen_len=args.gen_len, warmup=args.warmup,
                             repeat=args.repeat, seed=args.seed, threads=None)
    backend = HttpBackend(HttpTarget(args.base_url, args.model, args.api_key, not args.no_ignore_eos,
                                     args.timeout, args.label))
    report = new_report(settings, {"name": args.model, "vocab_size": args.vocab_size, "num_layers": 0,
                                   "hidden_size": 0}, threads=None, measure_bw=False)
    points = settings.points()
    advance, close = progress_bar(len(points) * (settings.warmup + settings.repeat), args.quiet)
    try:
        info, rows = run_backend(backend, settings, args.vocab_size, None, advance)
    finally:
        close()
    report.backends.append(info.to_dict())
    report.results.extend(rows)
    report.notes.extend(backend.step_notes())
    report.notes.extend(backend.client_notes())
    data = report.to_dict()
    validate(data)
    write_outputs(data, args.json_out, args.plot_out)
    print(markdown_table(data["results"]))
    for note in data["notes"]:
        print(note)
    return 1 if any(r["error"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
