#!/usr/bin/env bash
# On the GPU host (PyTorch, no package index), after benchmarks/gpu/prepare_tvm_decode.sh built .devrun-tvm/
# here and it travelled (device tool: carry [".devrun-tvm"]): install the runtime-only TVM, make the
# Llama-3.2-1B synth weights from the seed, rebuild the fp16 and int4 g32 artifacts around the prebuilt
# libraries, and run benchmarks/gpu/tvm_decode.py (decode tok/s at batch 1/32/256, roofline from the
# measured copy bandwidth). Raw JSON and logs go to $OUT. Budget: under 8 minutes on an H200.
#   bash benchmarks/gpu/run_tvm_decode.sh
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
D=.devrun-tvm
stamp() { echo "== $(date +%T) $*"; }
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 TVM_NUM_THREADS=${TVM_NUM_THREADS:-8}
PY=${PY:-python3}
SITE=/tmp/llmc-site
stamp install
if [ ! -d "$SITE/tvm" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" $D/whl/*.whl || exit 1
    tar -C "$SITE" -xzf $D/tvm-runtime.tgz || exit 1
fi
export PYTHONPATH=$SITE:$PWD
"$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, tvm; print('torch', torch.__version__, torch.version.cuda, '| tvm', tvm.__version__, \
'runtime-only' if 'tvm_compiler' not in tvm.base._LOADED_LIBS else 'full')" | tee -a "$OUT/gpu.txt"
SRC=/tmp/llama-3.2-1b-synth
A=/tmp/llmc-tvm-1b
stamp synth
[ -d "$SRC" ] || "$PY" -m llmc synth --preset llama-3.2-1b --dtype float16 --seed 0 -o "$SRC" || exit 1
status=0
for q in none int4; do
    stamp "artifact llama1b-$q"
    [ -d "$A/llama1b-$q" ] || timeout 240 "$PY" benchmarks/gpu/reuse_tvm_library.py "$SRC" "$D/prebuilt/llama1b-$q" \
        "$A/llama1b-$q" 2>&1 | tail -3
    stamp "tvm_decode llama1b-$q"
    timeout 200 "$PY" benchmarks/gpu/tvm_decode.py "$A/llama1b-$q" --batch-sizes 1,32,256 --context 128 \
        --steps 32 --json "$OUT/tvm-decode-llama1b-$q.json" 2>&1 | grep -v "Warning" | tee "$OUT/tvm-decode-$q.log" \
        | tail -8 || status=1
done
stamp done
exit $status
