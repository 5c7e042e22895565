#!/usr/bin/env bash
# Here, before a device call: the wheels benchmarks/gpu/torch_cuda.sh installs on the GPU host (its
# image has torch, triton, transformers, numpy, safetensors, tokenizers, ...; not these). Into .whl/
# (ignored by git); name .whl in the call's carry.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PLAT="--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64"
rm -rf .whl && mkdir -p .whl
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp $PLAT -d .whl \
    gguf==0.19.0 jsonschema jsonschema-specifications referencing rpds-py
du -sh .whl
