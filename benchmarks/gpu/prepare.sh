#!/usr/bin/env bash
# Build .devrun/: what a GPU host that cannot reach the package index needs to run llmc's CUDA
# checks and benchmarks (benchmarks/gpu/run_device.sh): a runtime-only TVM (3.6 MiB instead of the
# 96 MiB wheel), wheels the host lacks, stories260k, and tvm cuda artifacts compiled HERE with the
# full wheel (the SmolLM2-shaped ones without weights: run_device.sh rebuilds those from the same
# seed with benchmarks/gpu/reuse_tvm_library.py).
# Run from the repo root with the tvm extra installed:  bash benchmarks/gpu/prepare.sh [ARCH]
set -euo pipefail
ARCH=${1:-h100}
PY=${PY:-.venv/bin/python}
LLMC=${LLMC:-.venv/bin/llmc}
SHARED=${LLMC_SHARED_DIR:-../shared}
D=.devrun
rm -rf "$D" && mkdir -p "$D/prebuilt" "$D/shared/models"  # .gitignore ignores /.devrun*/

. benchmarks/gpu/runtime_bundle.sh
bundle_runtime "$D"

cp -r "$SHARED/models/stories260k" "$D/shared/models/"
# tests/targets/test_cuda.py's model (head_dim 64: TVM's CUDA attention refuses stories260k's 8)
"$PY" -c "import sys; from pathlib import Path; from tests.models import CUDA_TINY, write_random_hf_model as w
w(Path(sys.argv[1]), **CUDA_TINY)" "$D/prebuilt/tiny-hf"
"$LLMC" compile "$D/prebuilt/tiny-hf" --target tvm --device cuda --arch "$ARCH" -o "$D/prebuilt/tiny"
"$LLMC" compile "$D/prebuilt/tiny-hf" --target tvm --device cuda --arch "$ARCH" --quant int4 -o "$D/prebuilt/tiny-int4"
SMOL=$(mktemp -d)/smollm2-135m
"$LLMC" synth --preset smollm2-135m --dtype float16 --seed 0 -o "$SMOL"
for q in none int8 int4; do
    "$LLMC" compile "$SMOL" --target tvm --device cuda --arch "$ARCH" --quant $q -o "$D/prebuilt/smol-$q"
    rm -r "$D/prebuilt/smol-$q/weights"
done
rm -rf "$(dirname "$SMOL")"
du -sh "$D"
