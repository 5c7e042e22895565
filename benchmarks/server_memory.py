#!/usr/bin/env python
"""What oversized requests cost an ``llmc serve`` process: its RSS over time and each request's
status and latency.

    python benchmarks/server_memory.py ARTIFACT --size-mb 21 --requests 3 --kind text

Starts ``llmc serve ARTIFACT`` on a free port (extra server options after ``--``), waits for
/health, samples the server's resident memory every 50 ms, sends ``--requests`` requests at the same
moment (``--kind``: ``text``, a completion prompt of ``--size-mb`` MB of words; ``chat``, one chat
message of that size; ``ids``, a completion prompt of token ids whose JSON is that size), and prints
a JSON report: the RSS before, the peak and after, and per request its HTTP status, the start of
its error message and its latency. Issue 19 measured three 21 MB prompts taking the server from
0.45 to 5.7 GB and 60 s each before a 400.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import json
import random
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmc_server import llmc_server

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "a", "lazy", "dog", "while", "seven", "wizards",
         "quietly", "judge", "boxing", "matches", "under", "pale", "moonlight"]


def body_of(kind: str, size: int, seed: int) -> bytes:
    """A request body of about ``size`` bytes."""
    rng = random.Random(seed)
    if kind == "ids":
        ids: list[int] = []
        length = 2
        while length < size:
            t = rng.randrange(1, 30000)
            ids.append(t)
            length += len(str(t)) + 1
        return json.dumps({"prompt": ids, "max_tokens": 4}).encode()
    words: list[str] = []
    length = 0
    while length < size:
        w = rng.choice(WORDS)
        words.append(w)
        length += len(w) + 1
    text = " ".join(words)
    if kind == "chat":
        return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode()
    return json.dumps({"prompt": text, "max_tokens": 4}).encode()


class RssSampler(threading.Thread):
    """Samples the resident memory of a process and its children."""

    def __init__(self, pid: int, interval: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.stop_event = threading.Event()

    def rss(self) -> int:
        procs = [self.proc, *self.proc.children(recursive=True)]
        total = 0
        for p in procs:
            with contextlib.suppress(psutil.Error):
                total += p.memory_info().rss
        return total

    def run(self) -> None:
        t0 = time.perf_counter()
        while not self.stop_event.is_set():
            self.samples.append((time.perf_counter() - t0, self.rss()))
            time.sleep(self.interval)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--size-mb", type=float, default=21.0)
    parser.add_argument("--requests", type=int, default=3)
    parser.add_argument("--kind", choices=["text", "chat", "ids"], default="text")
    parser.add_argument("--timeout", type=float, default=600.0)
    argv = sys.argv[1:]
    cut = argv.index("--") if "--" in argv else len(argv)  # what follows -- goes to llmc serve
    args = parser.parse_args(argv[:cut])
    args.server_args = argv[cut + 1:]

    with llmc_server(args.artifact, args.server_args) as server:
        url = server.url
        path = "/v1/chat/completions" if args.kind == "chat" else "/v1/completions"
        bodies = [body_of(args.kind, int(args.size_mb * 1e6), seed) for seed in range(args.requests)]
        sampler = RssSampler(server.process.pid)
        before = sampler.rss()
        sampler.start()

        def send(body: bytes) -> dict[str, Any]:
            t0 = time.perf_counter()
            try:
                r = httpx.post(url + path, content=body, headers={"content-type": "application/json"},
                               timeout=args.timeout)
                status: int | str = r.status_code
                try:
                    message = str(r.json().get("error", {}).get("message", ""))[:160]
                except ValueError:
                    message = r.text[:160]
            except httpx.HTTPError as exc:
                status, message = type(exc).__name__, str(exc)[:160]
            return {"status": status, "seconds": round(time.perf_counter() - t0, 2), "message": message}

        t0 = time.perf_counter()
        with concurrent.futures.ThreadPoolExecutor(args.requests) as pool:
            results = list(pool.map(send, bodies))
        elapsed = time.perf_counter() - t0
        time.sleep(1.0)
        sampler.stop_event.set()
        sampler.join()
        peak = max(r for _, r in sampler.samples)
        report = {
            "kind": args.kind, "requests": args.requests, "body_bytes": len(bodies[0]),
            "server_args": args.server_args,
            "rss_before_gb": round(before / 1e9, 3), "rss_peak_gb": round(peak / 1e9, 3),
            "rss_after_gb": round(sampler.rss() / 1e9, 3), "wall_seconds": round(elapsed, 2),
            "health_after": httpx.get(f"{url}/health", timeout=10).status_code,
            "results": results,
        }
        print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
