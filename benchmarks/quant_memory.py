"""Resident memory of compiled artifacts on the torch CPU target, each in a fresh process.

    .venv/bin/python benchmarks/quant_memory.py ARTIFACT [ARTIFACT ...]

For each artifact: VmRSS after ``import torch`` + llmc, VmRSS after loading the artifact, and the
high-water mark (VmHWM) after a 16-token prefill and 8 greedy decode steps, in MiB. The child is
started with ``subprocess`` from a small parent, so its high-water mark is its own.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

CHILD = r"""
import json, sys
def status():
    d = dict(line.split(':', 1) for line in open('/proc/self/status'))
    return int(d['VmRSS'].split()[0]) / 1024, int(d['VmHWM'].split()[0]) / 1024
import torch
from llmc.runtime.loader import load_model
from llmc.runtime.generate import generate_ids
from llmc.runtime.sampling import SamplingParams
imported = status()[0]
model = load_model(sys.argv[1], threads=1)
loaded = status()[0]
generate_ids(model, list(range(10, 26)), SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True))
print(json.dumps({"imported": imported, "loaded": loaded, "peak": status()[1]}))
"""


def main() -> None:
    print("| artifact | weights MiB | RSS after import | RSS after load (Δ) | peak after prefill+decode |")
    print("|---|---:|---:|---:|---:|")
    for path in sys.argv[1:]:
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        size = manifest["files"]["weights/model.safetensors"]["bytes"] / 2**20
        out = subprocess.run([sys.executable, "-c", CHILD, path], capture_output=True, text=True, check=True)
        r = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {Path(path).name} | {size:.1f} | {r['imported']:.0f} | {r['loaded']:.0f} "
              f"({r['loaded'] - r['imported']:+.0f}) | {r['peak']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
