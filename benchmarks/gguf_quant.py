"""SmolLM2-135M-Instruct Q4_1 GGUF compiled with ``--quant native`` and ``--quant none``, side by side.

    .venv/bin/python benchmarks/gguf_quant.py [--modes native,none] [--steps 16] [--out DIR]

For each mode: compile time (front end -> passes -> artifact), artifact and weight-file size, then
greedy decoding of "The capital of France is" on the torch CPU target with one torch thread.
Decode speed is reported both per wall second and per second of this process's CPU time (the
figure that survives a machine shared with other jobs).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from llmc.assets import fetch_smollm2
from llmc.compiler.ir.batch import BatchLayout
from llmc.driver import CompileOptions, compile_model
from llmc.runtime.artifact import Artifact
from llmc.runtime.executor import StepBatch
from llmc.runtime.registry import get_target

PROMPT = "The capital of France is"


def _size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def run_mode(gguf: Path, mode: str, out: Path, steps: int) -> dict[str, object]:
    t0 = time.perf_counter()
    art = compile_model(gguf, out / f"smollm2-{mode}", CompileOptions(quant=mode))
    compile_s = time.perf_counter() - t0
    artifact = Artifact.load(art, verify=False)
    executor = get_target(artifact.target).load(artifact)
    tokenizer = artifact.tokenizer()
    assert tokenizer is not None
    ids = tokenizer.encode(PROMPT)
    blocks = -(-(len(ids) + steps) // executor.kv_spec().block_size)
    executor.init_cache(blocks)
    table = [list(range(blocks))]
    n = len(ids)
    logits = executor.step(StepBatch(np.asarray(ids), BatchLayout((0,), (n,), (n,)), table, np.asarray([n - 1])))
    out_ids: list[int] = []
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        out_ids.append(int(np.argmax(logits[0])))
        n += 1
        logits = executor.step(StepBatch(np.asarray(out_ids[-1:]), BatchLayout((0,), (1,), (n,)), table,
                                         np.asarray([0])))
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    return {
        "mode": mode,
        "compile_s": round(compile_s, 2),
        "artifact_mb": round(_size(art) / 1e6, 1),
        "weights_mb": round(_size(art / "weights") / 1e6, 1),
        "decode_tok_s_wall": round(steps / wall, 2),
        "decode_tok_s_cpu": round(steps / cpu, 2),
        "text": tokenizer.decode(out_ids),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", default="native,none")
    parser.add_argument("--steps", type=int, default=16)
    parser.add_argument("--out", type=Path, default=Path("/tmp/llmc-gguf-bench"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    gguf = fetch_smollm2()
    print(f"source: {gguf} ({gguf.stat().st_size / 1e6:.1f} MB)")
    for mode in args.modes.split(","):
        print(json.dumps(run_mode(gguf, mode, args.out, args.steps)))


if __name__ == "__main__":
    main()
