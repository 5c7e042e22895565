#!/usr/bin/env python
"""Soak an ``llmc serve`` process: many concurrent clients for a bounded time, streaming requests
that hang up at random, bad requests mixed in; report failures, leaked KV blocks and memory growth.

    python benchmarks/server_soak.py ARTIFACT --clients 100 --seconds 300 [-- llmc serve options]

Starts ``llmc serve ARTIFACT`` on a free port, then runs ``--clients`` clients, each in a loop until
``--seconds`` have passed, drawing (seeded) one of: a streamed completion or chat that reads a
random number of chunks and then disconnects (``--disconnect`` of them) or reads to the end; a
whole (non-streamed) completion; a bad request (invalid JSON, a lone surrogate, token ids outside
the vocabulary, a prompt longer than the context, a body over the size limit, an unknown model,
``max_tokens`` of 2^40). A *failure* is a 5xx, a connection error the client did not cause, a bad
request answered with 2xx, a good one refused (other than 429/503, which are counted as back-pressure),
or a stream that ends without ``[DONE]``. After the clients stop, the script waits for the engine
to settle and reads /metrics: KV blocks still in use and sequences still running are leaks. The
server's RSS is sampled throughout. Prints a JSON report; exits 1 when anything failed or leaked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmc_server import llmc_server
from server_memory import RssSampler

WORDS = ["once", "upon", "a", "time", "there", "was", "little", "robot", "who", "loved", "to", "read"]


class Soak:
    def __init__(self, url: str, args: argparse.Namespace, context: int) -> None:
        self.url = url
        self.args = args
        self.context = context
        self.outcomes: Counter[str] = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []

    def fail(self, what: str) -> None:
        self.outcomes["failure"] += 1
        if len(self.failures) < 50:
            self.failures.append(what[:300])

    def _text(self, rng: random.Random, words: int) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(words))

    def _bad(self, rng: random.Random) -> tuple[str, bytes, str]:
        kind = rng.choice(["json", "surrogate", "ids", "context", "size", "model", "max_tokens"])
        if kind == "json":
            body = b'{"prompt": "abc", "max_tokens": '
        elif kind == "surrogate":
            body = b'{"messages": [{"role": "user", "content": "hi \\ud800"}], "max_tokens": 4}'
        elif kind == "ids":
            body = json.dumps({"prompt": [1, -5, 2**40], "max_tokens": 4}).encode()
        elif kind == "context":
            body = json.dumps({"prompt": "word " * (self.context * 8), "max_tokens": 4}).encode()
        elif kind == "size":
            body = json.dumps({"prompt": "x" * (self.args.max_request_bytes + 1024)}).encode()
        elif kind == "model":
            body = json.dumps({"model": "no-such-model", "prompt": "hi", "max_tokens": 2}).encode()
        else:
            body = json.dumps({"prompt": "hi", "max_tokens": 2**40}).encode()
        path = "/v1/chat/completions" if kind == "surrogate" else "/v1/completions"
        return path, body, f"bad:{kind}"

    async def _stream(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        chat = rng.random() < 0.5
        tokens = rng.randint(8, self.args.max_tokens)
        if chat:
            path = "/v1/chat/completions"
            body: dict[str, Any] = {"messages": [{"role": "user", "content": self._text(rng, rng.randint(3, 40))}]}
        else:
            path = "/v1/completions"
            body = {"prompt": self._text(rng, rng.randint(3, 200))}
        body.update(max_tokens=tokens, stream=True, ignore_eos=True, temperature=rng.choice([0.0, 0.8]))
        hang_up = rng.random() < self.args.disconnect
        stop_after = rng.randint(1, tokens)
        chunks, done = 0, False
        async with client.stream("POST", path, json=body) as r:
            if r.status_code in (429, 503):
                self.outcomes["back-pressure"] += 1
                return
            if r.status_code != 200:
                self.fail(f"stream {path}: {r.status_code} {(await r.aread())[:200]!r}")
                return
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    done = True
                    break
                payload = json.loads(line[len("data: "):])
                if "error" in payload:
                    self.fail(f"stream {path}: in-band error {payload['error']}")
                    return
                chunks += 1
                if hang_up and chunks >= stop_after:
                    self.outcomes["disconnected"] += 1
                    return  # leaving the block closes the connection mid-stream
        if not done:
            self.fail(f"stream {path}: ended without [DONE] after {chunks} chunks")
        else:
            self.outcomes["streamed"] += 1

    async def _whole(self, client: httpx.AsyncClient, rng: random.Random) -> None:
        body = {"prompt": self._text(rng, rng.randint(3, 100)), "max_tokens": rng.randint(1, 16), "ignore_eos": True}
        r = await client.post("/v1/completions", json=body)
        if r.status_code in (429, 503):
            self.outcomes["back-pressure"] += 1
        elif r.status_code != 200:
            self.fail(f"completion: {r.status_code} {r.text[:200]}")
        else:
            self.outcomes["whole"] += 1

    async def client(self, index: int, deadline: float) -> None:
        rng = random.Random(self.args.seed * 1000 + index)
        limits = httpx.Limits(max_connections=1)
        async with httpx.AsyncClient(base_url=self.url, timeout=self.args.request_timeout, limits=limits) as client:
            while time.monotonic() < deadline:
                start = time.monotonic()
                roll = rng.random()
                try:
                    if roll < self.args.bad:
                        path, raw, kind = self._bad(rng)
                        r = await client.post(path, content=raw, headers={"content-type": "application/json"})
                        if r.status_code >= 500 or r.status_code < 400:
                            self.fail(f"{kind}: {r.status_code} {r.text[:200]}")
                        else:
                            self.outcomes[f"{kind} {r.status_code}"] += 1
                    elif roll < self.args.bad + 0.2:
                        await self._whole(client, rng)
                    else:
                        await self._stream(client, rng)
                except httpx.HTTPError as exc:
                    self.fail(f"client {index}: {type(exc).__name__}: {exc}")
                self.latencies.append(time.monotonic() - start)


def _metric(text: str, name: str) -> float:
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return float("nan")


async def _run(url: str, args: argparse.Namespace, context: int) -> Soak:
    soak = Soak(url, args, context)
    deadline = time.monotonic() + args.seconds
    await asyncio.gather(*(soak.client(i, deadline) for i in range(args.clients)))
    return soak


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--clients", type=int, default=100)
    parser.add_argument("--seconds", type=float, default=300.0)
    parser.add_argument("--max-tokens", type=int, default=64, help="most tokens a streamed request asks for")
    parser.add_argument("--disconnect", type=float, default=0.3, help="share of streams that hang up early")
    parser.add_argument("--bad", type=float, default=0.2, help="share of requests that are bad")
    parser.add_argument("--max-request-bytes", type=int, default=8 * 2**20, help="the server's limit (passed on)")
    parser.add_argument("--request-timeout", type=float, default=300.0)
    parser.add_argument("--seed", type=int, default=0)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows -- goes to llmc serve
    args = parser.parse_args(argv[:cut])
    args.server_args = argv[cut + 1:]

    serve_args = ["--max-request-bytes", str(args.max_request_bytes), *args.server_args]
    with llmc_server(args.artifact, serve_args) as server:
        url = server.url
        context = int(httpx.get(f"{url}/v1/models", timeout=10).json()["data"][0]["max_model_len"])
        sampler = RssSampler(server.process.pid, interval=0.5)
        rss_start = sampler.rss()
        sampler.start()
        t0 = time.monotonic()
        soak = asyncio.run(_run(url, args, context))
        elapsed = time.monotonic() - t0
        settle = time.monotonic() + 30
        while True:  # aborted sequences are freed at the engine's next step
            metrics = httpx.get(f"{url}/metrics", timeout=10).text
            used = _metric(metrics, "llmc_kv_cache_used_blocks")
            running = _metric(metrics, "llmc_num_requests_running") + _metric(metrics, "llmc_num_requests_waiting")
            if (used == 0 and running == 0) or time.monotonic() > settle:
                break
            time.sleep(0.5)
        sampler.stop_event.set()
        sampler.join()
        rss_end = sampler.rss()
        alive = server.process.poll() is None and httpx.get(f"{url}/health", timeout=10).status_code == 200
        lat = sorted(soak.latencies) or [0.0]
        report = {
            "clients": args.clients, "seconds": round(elapsed, 1), "requests": len(soak.latencies),
            "outcomes": dict(sorted(soak.outcomes.items())), "failures": soak.failures,
            "kv_used_blocks_after": used, "sequences_left": running, "healthy_after": alive,
            "rss_start_mb": round(rss_start / 2**20), "rss_peak_mb": round(max(r for _, r in sampler.samples) / 2**20),
            "rss_end_mb": round(rss_end / 2**20),
            "latency_p50_s": round(lat[len(lat) // 2], 2), "latency_p99_s": round(lat[int(len(lat) * 0.99)], 2),
            "aborted_total": _metric(metrics, "llmc_sequences_aborted_total"),
        }
        print(json.dumps(report, indent=1))
        ok = not soak.failures and used == 0 and running == 0 and alive
        return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
