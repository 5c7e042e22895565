#!/usr/bin/env bash
# llmc serve against llama-server on the same GGUF through HTTP, the same client and load
# (benchmarks/http_load.py: the official openai client, streamed /v1/completions, seeded random
# prompt ids, ignore_eos), one server at a time on the same port.
#
#   benchmarks/llamacpp_http.sh MODEL.gguf OUT_PREFIX [THREADS] [CONCURRENCY] [PROMPT_LEN] [GEN_LEN]
#
# writes OUT_PREFIX.llmc.json and OUT_PREFIX.llamacpp.json (bench JSON schema). ROUNDS=N (default 1)
# alternates the two servers N times (llmc, llama.cpp, llmc, ...), writes OUT_PREFIX.rK.{llmc,llamacpp}.json
# per round K and OUT_PREFIX.rounds.json (each round's aggregate tok/s of both at each concurrency, their
# ratio, and the medians), so that both see the same stretch of a drifting machine. llmc serves the
# default compile of the GGUF (`llmc serve MODEL.gguf`, compiled once and cached); llama-server runs
# with -np 32 -t THREADS and a context of 32 x (PROMPT_LEN + GEN_LEN) tokens (each slot gets one
# request's worth). Tools from $LLAMA_BIN (default ~/.cache/llmc/llama.cpp/bin).
set -euo pipefail
gguf=$1
out=$2
threads=${3:-$(nproc)}
conc=${4:-1,32}
plen=${5:-64}
glen=${6:-64}
bin=${LLAMA_BIN:-$HOME/.cache/llmc/llama.cpp/bin}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python}
port=${PORT:-8397}
vocab=${VOCAB:-$("$py" -c "import sys, gguf; print(len(gguf.GGUFReader(sys.argv[1]).fields['tokenizer.ggml.tokens'].data))" "$gguf")}
server=
stop() { if [ -n "$server" ]; then kill "$server" 2>/dev/null || true; wait "$server" 2>/dev/null || true; server=; fi; }
trap stop EXIT
wait_up() {
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$port/v1/models" >/dev/null 2>&1; then return 0; fi
    if ! kill -0 "$server" 2>/dev/null; then echo "server exited" >&2; return 1; fi
    sleep 0.5
  done
  echo "server did not come up" >&2
  return 1
}
load() {  # label json
  "$py" "$here/http_load.py" --base-url "http://127.0.0.1:$port/v1" --model m --vocab-size "$vocab" \
    --label "$1" --concurrency "$conc" --prompt-len "$plen" --gen-len "$glen" --quiet --json "$2"
}

rounds=${ROUNDS:-1}
for round in $(seq "$rounds"); do
  prefix=$out
  if [ "$rounds" -gt 1 ]; then prefix=$out.r$round; fi

  OMP_NUM_THREADS=$threads "$py" -m llmc.cli serve "$gguf" --port "$port" --served-model-name m --log-level warning &
  server=$!
  wait_up
  load "llmc serve" "$prefix.llmc.json"
  stop

  LD_LIBRARY_PATH="$bin:${LD_LIBRARY_PATH:-}" "$bin/llama-server" -m "$gguf" --port "$port" -a m -t "$threads" \
    -np 32 -c $((32 * (plen + glen))) --log-disable >/dev/null 2>&1 &
  server=$!
  wait_up
  load "llama-server -np 32" "$prefix.llamacpp.json"
  stop
done

if [ "$rounds" -gt 1 ]; then
  "$py" - "$out" "$rounds" <<'PY'
import json, statistics, sys
out, rounds = sys.argv[1], int(sys.argv[2])
def aggregate(path):
    return {r["size"]: r["aggregate_tok_s"] for r in json.load(open(path))["results"]}
per = [(aggregate(f"{out}.r{k}.llmc.json"), aggregate(f"{out}.r{k}.llamacpp.json")) for k in range(1, rounds + 1)]
summary = {}
for size in sorted(per[0][0]):
    llmc = [a[size] for a, _ in per]
    peer = [b[size] for _, b in per]
    ratios = [x / y for x, y in zip(llmc, peer)]
    summary[str(size)] = {"llmc_aggregate_tok_s": llmc, "llamacpp_aggregate_tok_s": peer, "ratio": ratios,
                          "median_ratio": statistics.median(ratios)}
    print(f"concurrency {size}: llmc / llama-server per round " + ", ".join(f"{r:.2f}x" for r in ratios)
          + f"; median {statistics.median(ratios):.2f}x")
json.dump({"rounds": rounds, "concurrency": summary}, open(f"{out}.rounds.json", "w"), indent=1)
PY
fi
