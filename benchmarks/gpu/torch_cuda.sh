#!/usr/bin/env bash
# The torch target's CUDA path on a GPU host without a package index (issues 17 and 18), one command:
#   bash benchmarks/gpu/torch_cuda.sh [extra arguments of benchmarks/gpu/torch_cuda.py]
# Needs .whl/ from benchmarks/gpu/prepare_torch_cuda.sh (wheels the host lacks: gguf, jsonschema),
# carried with the call. Raw JSON and the summary go to $OUT (or ./gpu-out); at most 8 files.
set -uo pipefail
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
SITE=/tmp/llmc-site
if [ ! -f "$SITE/.done" ]; then
    if ls .whl/*.whl >/dev/null 2>&1; then
        "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .whl/*.whl || exit 1
    fi
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
    touch "$SITE/.done" 2>/dev/null || { mkdir -p "$SITE" && touch "$SITE/.done"; }
fi
export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
exec "$PY" benchmarks/gpu/torch_cuda.py --python "$PY" "$@"
