"""The engine's 32-sequence decode step with and without the native step's logits buffer reuse, in one process.

    python benchmarks/engine_logits_reuse_ab.py ARTIFACT [ROUNDS]

Loads ARTIFACT (a torch artifact that runs the native step program, e.g. the default compile of a
GGUF) in the continuous-batching engine, then alternates runs of 32 requests (64 random prompt ids,
128 greedy tokens, EOS ignored) with the reuse off (every step's logits in a freshly allocated
buffer, as before) and on. Prints each run's aggregate tok/s, the median time of the engine's
``StepLoop._step`` and a hash of all output tokens (equal in both modes), then the medians per mode.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from llmc.runtime.engine import Engine
from llmc.runtime.sampling import SamplingParams
from llmc.targets.torch import native


def main(path: str, rounds: int) -> None:
    engine = Engine.load(path, threads=2)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, engine.config.vocab_size, 64).tolist() for _ in range(32)]
    params = SamplingParams(max_tokens=128, temperature=0.0, ignore_eos=True)
    loop = engine._loop
    step_times: list[float] = []
    step = loop._step

    def timed_step() -> None:
        t0 = time.perf_counter()
        step()
        step_times.append(time.perf_counter() - t0)

    loop._step = timed_step  # type: ignore[method-assign]
    reuse = native.NativeStep._reusable_logits
    engine.generate(prompts, params)  # warm-up
    results: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for _ in range(rounds):
        for mode in ("off", "on"):
            native.NativeStep._reusable_logits = reuse if mode == "on" else (lambda self, rows: None)  # type: ignore
            step_times.clear()
            t0 = time.perf_counter()
            outs = engine.generate(prompts, params)
            wall = time.perf_counter() - t0
            tok_s = sum(len(o.token_ids) for o in outs) / wall
            results[mode].append((tok_s, float(np.median(step_times)) * 1e3))
            tokens = hash(tuple(tuple(o.token_ids) for o in outs))
            print(f"reuse {mode}: {tok_s:.1f} tok/s, median step {results[mode][-1][1]:.2f} ms, tokens {tokens}")
    native.NativeStep._reusable_logits = reuse  # type: ignore[method-assign]
    for mode, runs in results.items():
        print(f"reuse {mode}: median {np.median([r[0] for r in runs]):.1f} tok/s, "
              f"median step {np.median([r[1] for r in runs]):.2f} ms")
    engine.close()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 3)
