#!/usr/bin/env bash
# On a CUDA GPU host with PyTorch but no package index: install .devrun/ (benchmarks/gpu/prepare.sh),
# run the gpu tests and the SmolLM2-shaped decode benchmarks. Logs and JSON go to $OUT (or ./gpu-out).
#   bash benchmarks/gpu/run_device.sh [tests] [parity] [bench] [peers] [peers-compile]
set -uo pipefail
OUT=${OUT:-$PWD/gpu-out}; mkdir -p "$OUT"
STEPS=${*:-tests parity bench peers}
stamp() { echo "== $(date +%T) $*"; }
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
PY=${PY:-python3}
SITE=/tmp/llmc-site
if [ ! -d "$SITE/tvm" ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" .devrun/whl/*.whl || exit 1
    tar -C "$SITE" -xzf .devrun/tvm-runtime.tgz || exit 1
    "$PY" -m pip install -q --no-index --no-deps --no-build-isolation -e . || exit 1
fi
export PYTHONPATH=$SITE
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PY" -c "import torch, tvm; print('torch', torch.__version__, torch.version.cuda, '| tvm', tvm.__version__, \
'runtime-only' if 'tvm_compiler' not in tvm.base._LOADED_LIBS else 'full')" | tee -a "$OUT/gpu.txt"

if [[ " $STEPS " == *" tests "* ]]; then
    stamp tests
    LLMC_SHARED_DIR=$PWD/.devrun/shared LLMC_PREBUILT_TVM_CUDA=$PWD/.devrun/prebuilt \
        "$PY" -m pytest -q -p no:cacheprovider -rA tests/targets/test_cuda.py 2>&1 | tee "$OUT/pytest.log" | tail -15
fi

SMOL=/tmp/smollm2-135m-synth
A=/tmp/llmc-artifacts
NEED_MODELS=0
for s in $STEPS; do case $s in parity|bench|peers*) NEED_MODELS=1;; esac; done
if [ $NEED_MODELS = 1 ] && [ ! -d "$A/tvm-int4" ]; then
    stamp "SmolLM2-shaped artifacts"
    "$PY" -m llmc synth --preset smollm2-135m --dtype float16 --seed 0 -o "$SMOL"
    for q in none int8 int4; do
        "$PY" benchmarks/gpu/reuse_tvm_library.py "$SMOL" ".devrun/prebuilt/smol-$q" "$A/tvm-$q" || exit 1
        "$PY" -m llmc compile "$SMOL" --target torch --device cuda --quant $q -o "$A/torch-$q" || exit 1
    done
fi
BENCH="--prompt-len 128 --gen-len 64 --warmup 1 --repeat 3"
if [[ " $STEPS " == *" parity "* ]]; then
    for q in none int8 int4; do
        stamp "parity tvm-$q vs torch-$q"
        "$PY" benchmarks/gpu/parity.py "$A/tvm-$q" "$A/torch-$q" --json "$OUT/parity-$q.json" | tail -1
    done
fi
if [[ " $STEPS " == *" bench "* ]]; then
    for a in tvm-none torch-none tvm-int4 torch-int4 tvm-int8 torch-int8; do
        stamp "llmc bench $a"
        "$PY" -m llmc bench "$A/$a" --scenario single,batch --batch-sizes 1,8,32 $BENCH --quiet \
            --json "$OUT/bench-$a.json" 2>&1 | tail -8
    done
fi
if [[ " $STEPS " == *" peers"* ]]; then
    ENGINES=hf-eager; [[ " $STEPS " == *" peers-compile "* ]] && ENGINES=hf-eager,hf-compile
    stamp "peers $ENGINES"
    "$PY" benchmarks/peers.py --name smollm2-135m-synth --llmc "$A/tvm-none" --llmc "$A/torch-none" \
        --hf "$SMOL" --hf-dtype float16 --engines $ENGINES --device cuda --scenario single,batch \
        --batch-sizes 1,8,32 $BENCH --quiet --work-dir /tmp/peers \
        --json "$OUT/peers.json" --markdown "$OUT/peers.md" 2>&1 | tail -30
fi
stamp done
