"""Two builds of llmc's CPU kernels side by side, in lockstep: one process per build, runs alternated.

    python benchmarks/kernels_lockstep_ab.py where
    python benchmarks/kernels_lockstep_ab.py gemm A B [--case q5_0] [--rows 32] [--count 20] [--steps 40]
    python benchmarks/kernels_lockstep_ab.py attention A B [--layers 30] [--cache distinct] [--ctx 96] [--prompt N]
    python benchmarks/kernels_lockstep_ab.py batch|engine A B --artifact DIR [--seqs 32] [--gen 32] [--steps 12]
    python benchmarks/kernels_lockstep_ab.py prefill A B --artifact DIR [--seqs 1] [--prompt 512]
    ... [--contend 0.25]   (any workload: a competing process keeps a quarter of one core busy)

``where`` builds the kernels of this checkout (if not built yet) and prints their folder; A and B are
two such folders (build one, check out the other version, build again). Each workload runs in two
child processes, one per build, which take turns one run at a time (A B, then B A, ...), so both see
the same moments of a shared machine's drift, which on a VM can exceed the effect being measured
(separate processes run one after the other have differed by 20-40% on the same code here). Prints
both medians, the median of the per-turn ratios B/A and whether both builds gave the same bits.
``LLMC_CPU_ISA`` picks the kernel path for both; the host's other work should be held off (e.g. under
a CPU lock) as for any benchmark. ``--contend F`` adds a known competitor instead: a process that keeps
F of one core busy (in bursts, 10 ms apart) through every turn, as an HTTP load client and the server's
event loop do beside the step (how the kernels' thread pool copes with losing a core at times).

- ``gemm``: ``KernelWeight.linear`` at ``--rows`` rows over ``--count`` distinct random weights of a
  SmolLM2 shape and block format (beyond the caches when many), 1 torch thread (``--threads``).
- ``attention``: a native program of 30 attention layers (SmolLM2's 9 heads, 3 kv heads, 64 wide) over
  32 sequences' float16 paged cache at ``--ctx`` (+ up to 40) positions; ``--cache same`` reuses one
  layer's cache (it stays in cache: the compute alone), ``distinct`` gives each layer its own.
  ``--prompt N``: prefill instead: ``--seqs`` prompts of N new rows each at positions 0..N-1 (rope, the
  rows' stores into the cache, causal attention; ``--seqs 8 --prompt 64`` is the engine's 512-row prompt
  step under a burst of 64-token requests).
- ``batch``: ``llamacpp_compare.py``'s 32-sequence measure: a static batch of ``--seqs`` prompts of 64
  random ids on ``--artifact``'s executor, ``--gen`` greedy tokens each; the decode steps' time.
- ``prefill``: ``--seqs`` prompts of ``--prompt`` (default 64) random ids prefilled together on ``--artifact``'s
  executor (``llamacpp_compare.py``'s prefill measure at one sequence); the prefill's time.
- ``engine``: the continuous-batching engine on ``--artifact``: ``--seqs`` requests of 64 random ids,
  ``--gen`` greedy tokens each.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

GEMM_CASES = {"q5_0": (1536, 576, 5, 32, True), "q4_k": (1536, 576, 4, 32, False), "q6_k": (576, 1536, 6, 16, True),
              "q8_0": (4096, 576, 8, 32, True), "q4_0": (1536, 576, 4, 32, True), "q5_1": (1536, 576, 5, 32, False)}
"""(out, in, bits, group, symmetric): SmolLM2 shapes of each format (q8_0: 4096 of the tied head's 49152 rows)."""


def gemm_run(args: argparse.Namespace) -> Callable[[], str]:
    import torch

    from llmc.targets.torch import qkernels

    torch.set_num_threads(args.threads)
    out, inp, bits, group, sym = GEMM_CASES[args.case]
    rng = np.random.default_rng(0)
    weights = []
    for _ in range(args.count):
        codes = rng.integers(0, 2 ** bits, (out, inp), dtype=np.uint8)
        scales = (rng.random((out, -(-inp // group))) * 0.01).astype(np.float16)
        offsets = None if sym else (-(rng.random((out, -(-inp // group))) * 0.01)).astype(np.float16)
        zero = 2 ** (bits - 1) if sym else 0
        weights.append(qkernels.kernel_weight(codes, scales, offsets, group, zero, 2 ** bits - 1))
    x = torch.from_numpy(rng.standard_normal((args.rows, inp)).astype(np.float32))

    def run() -> str:
        return repr(float(sum(w.linear(x).double().sum() for w in weights)))
    return run


def attention_run(args: argparse.Namespace) -> Callable[[], str]:
    import torch

    from llmc.targets.torch import qkernels

    qk = qkernels.load()
    heads, kv_heads, hd, bs, layers = 9, 3, 64, 16, 30
    seqs = args.seqs
    rows = args.prompt or 1  # new rows per sequence
    cache_layers = 1 if args.cache == "same" else layers
    width = (heads + 2 * kv_heads) * hd
    rng = np.random.default_rng(0)
    prog = qk.NativeProgram(cache_layers, kv_heads, hd)
    x = prog.buffer(width, False)
    prog.embed((x, 0, width), torch.from_numpy(rng.standard_normal((512, width)).astype(np.float32)))
    for layer in range(layers):
        o = prog.buffer(heads * hd, False)
        prog.attention((o, 0, heads * hd), (x, 0, heads * hd), (x, heads * hd, kv_heads * hd),
                       (x, (heads + kv_heads) * hd, kv_heads * hd), layer if cache_layers > 1 else 0, heads, kv_heads,
                       hd, 0.125, -1, 0, False)
    prog.set_logits((o, 0, heads * hd))
    per_seq = -(-(max(args.ctx, rows) + 64) // bs)
    blocks = seqs * per_seq  # sequences' blocks interleaved, as the engine allocates them
    tables = torch.from_numpy(np.arange(blocks).reshape(per_seq, seqs).T.copy().astype(np.int64))
    gen = torch.Generator().manual_seed(1)
    k = torch.randn((cache_layers, blocks * bs, kv_heads, hd), generator=gen).half()
    v = torch.randn((cache_layers, blocks * bs, kv_heads, hd), generator=gen).half()
    ids = torch.from_numpy(rng.integers(0, 512, seqs * rows).astype(np.int64))
    qlens = torch.full((seqs,), rows, dtype=torch.int64)
    out_rows = torch.arange(seqs * rows)  # the output buffer has a row per token: all of them
    turn = [0]

    def run() -> str:
        ctx = torch.full((seqs,), rows if args.prompt else args.ctx + turn[0] % 40, dtype=torch.int64)
        turn[0] += 1
        out = prog.run(ids, qlens, ctx, tables, out_rows, k, v, bs, args.threads, True)
        return repr(float(out.double().sum()))
    return run


def batch_run(args: argparse.Namespace) -> Callable[[], tuple[str, float]]:
    from llmc.runtime.bench.backends import LlmcBackend

    backend = LlmcBackend(args.artifact, threads=args.threads)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, backend.executor.config.vocab_size, 64).tolist() for _ in range(args.seqs)]

    def run() -> tuple[str, float]:
        result = backend.run_batch(prompts, args.gen)
        return str(hash(tuple(map(tuple, result.token_ids or ())))), sum(result.step_s)
    return run


def prefill_run(args: argparse.Namespace) -> Callable[[], tuple[str, float]]:
    from llmc.runtime.bench.backends import LlmcBackend

    backend = LlmcBackend(args.artifact, threads=args.threads)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, backend.executor.config.vocab_size, args.prompt or 64).tolist()
               for _ in range(args.seqs)]

    def run() -> tuple[str, float]:
        result = backend.run_batch(prompts, 1)
        return str(hash(tuple(map(tuple, result.token_ids or ())))), result.prefill_s
    return run


def engine_run(args: argparse.Namespace) -> Callable[[], str]:
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    engine = Engine.load(args.artifact, threads=args.threads)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, engine.config.vocab_size, 64).tolist() for _ in range(args.seqs)]
    params = SamplingParams(max_tokens=args.gen, temperature=0.0, ignore_eos=True)

    def run() -> str:
        return str(hash(tuple(tuple(o.token_ids) for o in engine.generate(prompts, params))))
    return run


WORKLOADS = {"gemm": gemm_run, "attention": attention_run, "batch": batch_run, "prefill": prefill_run,
             "engine": engine_run}


def child(args: argparse.Namespace) -> None:
    from llmc.targets.torch import qkernels

    qkernels.load_from(args.build)
    run = WORKLOADS[args.workload](args)
    run()  # warm-up
    print("ready", flush=True)
    for _ in sys.stdin:
        t0 = time.perf_counter()
        result = run()
        seconds = time.perf_counter() - t0
        if isinstance(result, tuple):  # the workload timed its own part
            result, seconds = result
        print(f"{seconds:.7f} {result}", flush=True)


CONTENDER = """
import sys, time
busy, period = float(sys.argv[1]) * 0.01, 0.01
while True:
    t = time.perf_counter()
    while time.perf_counter() - t < busy:
        pass
    time.sleep(max(period - busy, 0.0))
"""
"""Keeps ``argv[1]`` of one core busy in bursts every 10 ms."""


def parent(args: argparse.Namespace, argv: list[str]) -> int:
    options = [a for a in argv if a not in (args.workload, args.a, args.b)]
    contender = (subprocess.Popen([sys.executable, "-c", CONTENDER, str(args.contend)]) if args.contend > 0 else None)
    try:
        return compare(args, options)
    finally:
        if contender is not None:
            contender.kill()
            contender.wait()


def compare(args: argparse.Namespace, options: list[str]) -> int:
    kids = [subprocess.Popen([sys.executable, __file__, "--child", build, args.workload, *options],
                             stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) for build in (args.a, args.b)]
    for kid in kids:
        if (kid.stdout.readline().strip() if kid.stdout else "") != "ready":
            raise SystemExit(f"a child failed to start (build {kid.args[3]})")
    times: list[list[float]] = [[], []]
    bits: list[list[str]] = [[], []]  # each child's results in turn order (the same inputs in both)
    for turn in range(args.steps):
        for i in (0, 1) if turn % 2 == 0 else (1, 0):
            time.sleep(0.005)  # the other child's pool threads go to sleep
            kids[i].stdin.write("go\n")
            kids[i].stdin.flush()
            seconds, result = kids[i].stdout.readline().split(maxsplit=1)
            times[i].append(float(seconds))
            bits[i].append(result.strip())
    for kid in kids:
        kid.stdin.close()
        kid.wait()
    a, b = np.array(times[0]), np.array(times[1])
    print(f"{args.workload}: A {np.median(a) * 1e3:.3f} ms, B {np.median(b) * 1e3:.3f} ms, B/A per turn: median "
          f"{np.median(b / a):.3f} (quartiles {np.quantile(b / a, 0.25):.3f}-{np.quantile(b / a, 0.75):.3f}, "
          f"{len(a)} turns); same bits: {bits[0] == bits[1]}")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["where"]:
        from llmc.targets.torch import qkernels

        module = qkernels.load()
        print(os.path.dirname(module.__file__) if module is not None else "the kernels could not be built here")
        return 0 if module is not None else 1
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--child", dest="build", help=argparse.SUPPRESS)
    parser.add_argument("workload", choices=sorted(WORKLOADS))
    if "--child" not in argv:
        parser.add_argument("a", help="folder of build A (see `where`)")
        parser.add_argument("b", help="folder of build B")
    parser.add_argument("--case", choices=sorted(GEMM_CASES), default="q5_0")
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--count", type=int, default=20)
    parser.add_argument("--cache", choices=("same", "distinct"), default="distinct")
    parser.add_argument("--ctx", type=int, default=96)
    parser.add_argument("--prompt", type=int, default=0, help="attention: prefill N rows per sequence")
    parser.add_argument("--artifact")
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--gen", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None, help="turns each (default: gemm/attention 40, else 12)")
    parser.add_argument("--contend", type=float, default=0.0,
                        help="fraction of one core a competing process keeps busy during the turns (0: none)")
    args = parser.parse_args(argv)
    if args.threads is None:
        args.threads = 1 if args.workload == "gemm" else 2
    if args.steps is None:
        args.steps = 12 if args.workload in ("batch", "engine") else 40
    if not 0.0 <= args.contend <= 1.0:
        parser.error("--contend is a fraction of one core, in [0, 1]")
    if args.workload in ("batch", "engine") and not args.artifact:
        parser.error(f"{args.workload} needs --artifact")
    if args.build:
        child(args)
        return 0
    return parent(args, argv)


if __name__ == "__main__":
    raise SystemExit(main())
