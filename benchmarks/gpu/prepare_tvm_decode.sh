#!/usr/bin/env bash
# Build .devrun-tvm/ for benchmarks/gpu/run_tvm_decode.sh: the runtime-only TVM and wheels
# (runtime_bundle.sh) and the Llama-3.2-1B tvm CUDA libraries compiled HERE with the full wheel, fp16
# and int4 g32, without weights (the device makes the same synth weights from the seed and
# benchmarks/gpu/reuse_tvm_library.py checks that its IR equals the prebuilt one's).
# Run from the repo root with the tvm extra installed:  bash benchmarks/gpu/prepare_tvm_decode.sh [ARCH]
# (~5 min on 2 cores, less with a warm nvcc cache; ~3 GB of /tmp for the synth weights, removed after;
# .devrun-tvm is 23 MiB, 9 of them the two artifacts' tokenizers).
set -euo pipefail
ARCH=${1:-sm_90a}
PY=${PY:-.venv/bin/python}
LLMC=${LLMC:-.venv/bin/llmc}
D=.devrun-tvm
rm -rf "$D" && mkdir -p "$D/prebuilt"  # .gitignore ignores /.devrun*/
. benchmarks/gpu/runtime_bundle.sh
bundle_runtime "$D"
SRC=$(mktemp -d)/llama-3.2-1b
"$LLMC" synth --preset llama-3.2-1b --dtype float16 --seed 0 -o "$SRC"
for q in none int4; do
    "$LLMC" compile "$SRC" --target tvm --device cuda --arch "$ARCH" --quant $q --group-size 32 \
        -o "$D/prebuilt/llama1b-$q"
    rm -r "$D/prebuilt/llama1b-$q/weights"
done
rm -rf "$(dirname "$SRC")"
du -sh "$D" "$D"/*
