"""Where a native step's time goes, by op and by step kind, on the continuous-batching engine.

    python benchmarks/step_profile.py ARTIFACT [--seqs 32] [--prompt-len 64] [--gen-len 64] [--threads 2] [--json OUT]

Sends ``--seqs`` requests of ``--prompt-len`` random ids, ``--gen-len`` greedy tokens each
(``ignore_eos``), through ``Engine.generate``: once untimed (other ids), then with every native step's
instructions timed (``NativeProgram.set_profiling``; a linear group counts as its last linear). Each
step is a *decode* step when every sequence in it has one new row, else a *prompt* step (it holds a
prompt chunk, maybe beside decode rows). Prints, per kind, the steps, their rows and the milliseconds per
step of each op (embed, rms_norm, add_rms_norm, linear, rope, attention, elementwise, swiglu,
gather_rows), and how many of the pool's pieces a thread computed again because another held it past
the patience (``qkernels.pool_counts``: preempted threads); ``--json`` writes the same figures. Only
artifacts whose executor runs native steps (the default CPU compile) can be profiled; the prompts are
fresh random ids, so the prefix cache never shortens the profiled prompts. The timers cost little (a clock
read per instruction), but like any profile this is a diagnosis, not a benchmark: `llmc bench` and
``llamacpp_compare.py`` measure speed.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np


class StepProfile:
    """Per-op seconds of the native steps run while attached, split by step kind."""

    def __init__(self) -> None:
        self.seconds: dict[str, collections.Counter[str]] = {"decode": collections.Counter(),
                                                             "prompt": collections.Counter()}
        self.steps: collections.Counter[str] = collections.Counter()
        self.rows: collections.Counter[str] = collections.Counter()
        self.wall: collections.Counter[str] = collections.Counter()

    def attach(self, native: dict[str, Any]) -> None:
        """Wrap each NativeStep's ``run`` so that its program times every instruction of each step."""
        for step in native.values():
            run = step.run

            def timed(batch: Any, *args: Any, _run: Any = run, _prog: Any = step.program, **kwargs: Any) -> Any:
                lens = list(batch.layout.query_lens)
                kind = "decode" if all(n == 1 for n in lens) else "prompt"
                _prog.set_profiling(True)  # zeroes the counters
                t0 = time.perf_counter()
                out = _run(batch, *args, **kwargs)
                self.wall[kind] += time.perf_counter() - t0
                for name, seconds in _prog.profile():
                    self.seconds[kind][name] += seconds
                _prog.set_profiling(False)
                self.steps[kind] += 1
                self.rows[kind] += sum(lens)
                return out
            step.run = timed

    def summary(self) -> dict[str, Any]:
        """{kind: {steps, rows, wall_ms_per_step, ops_ms_per_step: {op: ms}}} for the kinds that ran."""
        out: dict[str, Any] = {}
        for kind, steps in self.steps.items():
            if steps:
                ops = {name: s * 1e3 / steps for name, s in self.seconds[kind].most_common()}
                out[kind] = {"steps": steps, "rows": self.rows[kind], "wall_ms_per_step": self.wall[kind] * 1e3 / steps,
                             "ops_ms_per_step": ops}
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--seqs", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    engine = Engine.load(args.artifact, threads=args.threads)
    try:
        native = getattr(engine.executor, "native", None)
        if not native:
            reason = getattr(engine.executor, "native_reason", None) or "its executor has no native step program"
            print(f"step_profile: {args.artifact} does not run native steps ({reason})", file=sys.stderr)
            return 2
        vocab = engine.executor.config.vocab_size
        rng = np.random.default_rng(0)
        params = SamplingParams(max_tokens=args.gen_len, temperature=0.0, ignore_eos=True)

        def prompts() -> list[list[int]]:
            return [rng.integers(0, vocab, args.prompt_len).tolist() for _ in range(args.seqs)]

        from llmc.targets.torch import qkernels

        engine.generate(prompts(), params)  # warm-up: kernels, buffers, pages
        profile = StepProfile()
        profile.attach(native)
        pieces0, repeated0 = qkernels.pool_counts()
        engine.generate(prompts(), params)
        pieces1, repeated1 = qkernels.pool_counts()
    finally:
        engine.close()
    summary = profile.summary()
    pool = {"pieces": pieces1 - pieces0, "repeated": repeated1 - repeated0}
    for kind, row in summary.items():
        print(f"{kind}: {row['steps']} steps, {row['rows']} rows, {row['wall_ms_per_step']:.2f} ms a step")
        for name, ms in row["ops_ms_per_step"].items():
            print(f"  {name:<14} {ms:9.3f} ms")
    print(f"pool: {pool['pieces']} pieces, {pool['repeated']} computed again by an idle thread")
    if args.json:
        args.json.write_text(json.dumps({"artifact": str(args.artifact), "seqs": args.seqs,
                                         "prompt_len": args.prompt_len, "gen_len": args.gen_len,
                                         "threads": args.threads, "kinds": summary, "pool": pool}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
