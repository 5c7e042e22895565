#!/usr/bin/env bash
# Two revisions of llmc's CPU kernels through HTTP, alternated: llamacpp_http.sh at one concurrency, once
# per side and pair, with side A's or side B's kernel sources (targets/torch/csrc, qkernels.py) checked out
# into this working tree for its run (each revision's build is cached by its sources' hash), restored at
# the end. Each run serves the GGUF with `llmc serve` and llama-server in turn, so every round has its own
# llama.cpp figure; the ratios, not the raw rates, are what compare across a drifting machine.
#
#   benchmarks/http_kernels_ab.sh REV_A REV_B GGUF OUT_PREFIX [PAIRS=3] [CONCURRENCY=32] [ORDER=AB|BA]
#
# Writes OUT_PREFIX_{A,B}{1..PAIRS}.{llmc,llamacpp}.json (llamacpp_http.sh's reports) and prints, per run,
# llmc's and llama-server's aggregate tok/s and their ratio. Needs what llamacpp_http.sh needs (LLAMA_BIN,
# PYTHON); run it alone on the machine (e.g. under a CPU lock). Refuses a working tree with changes to the
# swapped files, which the checkouts would overwrite.
set -euo pipefail

if [ $# -lt 4 ]; then
  sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'
  exit 2
fi
REV_A=$1 REV_B=$2 GGUF=$3 OUT=$4 PAIRS=${5:-3} CONC=${6:-32} ORDER=${7:-AB}
cd "$(dirname "$0")/.."
FILES=(targets/torch/csrc targets/torch/qkernels.py)
if ! git diff --quiet HEAD -- "${FILES[@]}"; then
  echo "http_kernels_ab: ${FILES[*]} have uncommitted changes; commit or stash them first" >&2
  exit 2
fi
git rev-parse --verify -q "$REV_A^{commit}" >/dev/null || { echo "http_kernels_ab: no revision $REV_A" >&2; exit 2; }
git rev-parse --verify -q "$REV_B^{commit}" >/dev/null || { echo "http_kernels_ab: no revision $REV_B" >&2; exit 2; }
# (git restore also removes the tracked files a revision lacks)
restore() { git restore -q --source=HEAD --staged --worktree -- "${FILES[@]}"; }
trap restore EXIT

side_rev() { if [ "$1" = A ]; then echo "$REV_A"; else echo "$REV_B"; fi; }
for ((i = 1; i <= PAIRS; i++)); do
  for side in $(echo "$ORDER" | fold -w1); do
    restore
    git restore -q --source="$(side_rev "$side")" --staged --worktree -- "${FILES[@]}"
    ROUNDS=1 benchmarks/llamacpp_http.sh "$GGUF" "${OUT}_${side}${i}" 2 "$CONC" 64 64 > "${OUT}_${side}${i}.log" 2>&1
    "${PYTHON:-python}" - "${OUT}_${side}${i}" "$side$i" <<'EOF'
import json, sys
prefix, label = sys.argv[1], sys.argv[2]
def aggregate(path):
    rows = json.load(open(path))["results"]
    return rows[-1]["aggregate_tok_s"]
llmc, peer = aggregate(prefix + ".llmc.json"), aggregate(prefix + ".llamacpp.json")
print(f"{label}: llmc {llmc:.1f} tok/s, llama-server {peer:.1f} tok/s, ratio {llmc / peer:.2f}x")
EOF
  done
done
