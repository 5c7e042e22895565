#!/usr/bin/env python
"""Where ``llmc serve``'s CPU goes under streamed load: py-spy samples of the server process,
per thread, while ``benchmarks/http_load.py`` (the official openai client) loads it.

    python benchmarks/serve_profile.py ARTIFACT --vocab-size 49152 --concurrency 32 --prompt-len 64 \\
        --gen-len 64 --repeat 3 --raw prof.txt [--native] [--rate 100]

Starts ``llmc serve ARTIFACT --threads THREADS`` (``benchmarks/llmc_server.py``), runs one untimed
load, then the timed one, and prints the CPU seconds the server and the load client took in it.
With ``--raw`` it records the server with ``py-spy record --threads --idle --format raw`` meanwhile
and prints, per thread, the functions with the most samples, by their own frame and inclusive.
With ``--native`` the C frames are sampled too, so the GIL waits (``take_gil``: the
``pthread_cond_timedwait`` frames) are counted. py-spy itself takes CPU (run it at a low
``--rate``): use a run without ``--raw`` for throughput, this for where the time goes.
"""

from __future__ import annotations

import argparse
import collections
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llmc_server import llmc_server

HERE = Path(__file__).resolve().parent


def load(url: str, args: argparse.Namespace, repeat: int, json_out: str | None) -> None:
    cmd = [sys.executable, str(HERE / "http_load.py"), "--base-url", f"{url}/v1", "--model", "m",
           "--vocab-size", str(args.vocab_size), "--concurrency", args.concurrency, "--prompt-len",
           str(args.prompt_len), "--gen-len", str(args.gen_len), "--warmup", "0", "--repeat", str(repeat), "--quiet"]
    if json_out:
        cmd += ["--json", json_out]
    subprocess.run(cmd, check=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def summarize(raw: Path, top: int) -> str:
    """Per thread: samples, share running, top functions (own frame / inclusive)."""
    threads: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    inclusive: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    totals: collections.Counter[str] = collections.Counter()
    idle: collections.Counter[str] = collections.Counter()
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0]
        totals[thread] += n
        leaf = frames[-1]
        if "(idle)" in thread or leaf.startswith(("select ", "epoll_wait", "wait ", "_wait")):
            idle[thread] += n
        threads[thread][leaf] += n
        for f in set(frames[1:]):
            inclusive[thread][f] += n
    lines = []
    for thread, total in totals.most_common():
        lines.append(f"== {thread}: {total} samples")
        lines.append("  own frame:")
        for f, n in threads[thread].most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {f}")
        lines.append("  inclusive:")
        for f, n in inclusive[thread].most_common(top):
            lines.append(f"    {100 * n / total:5.1f}%  {f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--concurrency", default="32")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", default="2")
    parser.add_argument("--json", dest="json_out", help="http_load.py's report of the timed load.")
    parser.add_argument("--raw", help="Record py-spy samples of the timed load here (raw format) and summarize.")
    parser.add_argument("--native", action="store_true", help="py-spy --native (C frames: take_gil).")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second.")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--serve-arg", action="append", default=[], help="Extra llmc serve argument (repeatable).")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp, \
            llmc_server(args.artifact, ["--served-model-name", "m", "--threads", args.threads, *args.serve_arg],
                        Path(tmp) / "server.log") as server:
        load(server.url, args, 1, None)  # warm-up, untimed
        spy = None
        if args.raw:
            py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
            cmd = [py_spy, "record", "--pid", str(server.process.pid), "--format", "raw", "--threads", "--idle",
                   "--rate", str(args.rate), "--nonblocking", "-o", args.raw]
            if args.native:
                cmd.remove("--nonblocking")
                cmd.append("--native")
            spy = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        server_cpu = cpu_seconds(server.process.pid)
        client_cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        wall = time.perf_counter()
        try:
            load(server.url, args, args.repeat, args.json_out)
            wall = time.perf_counter() - wall
            server_cpu = cpu_seconds(server.process.pid) - server_cpu
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            client_cpu = after.ru_utime + after.ru_stime - client_cpu.ru_utime - client_cpu.ru_stime
            print(f"timed load: {wall:.2f} s wall; CPU seconds: server {server_cpu:.2f}, load client "
                  f"{client_cpu:.2f} (all {os.cpu_count()} cores: {os.cpu_count() * wall:.2f})")
        finally:
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                _, err = spy.communicate(timeout=60)
                if spy.returncode not in (0, -signal.SIGINT, 130):
                    print(err.decode(errors="replace"), file=sys.stderr)
        print(f"load average at the end: {os.getloadavg()[0]:.2f}")
    if args.raw:
        print(summarize(Path(args.raw), args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
