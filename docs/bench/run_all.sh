#!/bin/bash
# all peer comparisons, one after the other (never two at once)
cd /work/main
export PYTHONPATH=/tmp/llama_cpp_pre
SM=$HOME/.cache/llmc/SmolLM2-135M-Instruct.Q4_1.gguf
B=/tmp/bench_models
R=/tmp/bench_runs
date > $R/A0.time
.venv/bin/python benchmarks/peers.py --name SmolLM2-135M-Instruct-Q4_1 --llmc $B/smol_native --llmc $B/smol_f32 --gguf $SM --hf $B/smol_hf \
  --engines llama.cpp,hf-eager,hf-compile,ort-genai --ort-precision int4 --work-dir $R/work_smol \
  --scenario single --prompt-len 32 --gen-len 16 --warmup 1 --repeat 2 --threads 1 \
  --json $R/A0.json --plot $R/A0.png --markdown $R/A0.md --quiet > $R/A0.log 2>&1
date >> $R/A0.time
.venv/bin/python benchmarks/peers.py --name SmolLM2-135M-Instruct-Q4_1 --llmc $B/smol_f32 --gguf $SM --hf $B/smol_hf \
  --engines llama.cpp,hf-eager --work-dir $R/work_smol \
  --scenario concurrency --concurrency 1,8,32 --prompt-len 32 --gen-len 16 --warmup 1 --repeat 1 --threads 1 \
  --json $R/A1.json --plot $R/A1.png --markdown $R/A1.md --quiet > $R/A1.log 2>&1
date >> $R/A0.time
.venv/bin/python benchmarks/peers.py --name synthetic-Llama-3.2-1B-f16 --llmc $B/llama1b_f32 --gguf $B/llama1b.gguf --hf $B/llama1b_hf \
  --engines llama.cpp,hf-eager --work-dir $R/work_1b \
  --scenario single,concurrency --concurrency 8 --prompt-len 16 --gen-len 8 --warmup 1 --repeat 1 --threads 1 \
  --json $R/B.json --plot $R/B.png --markdown $R/B.md --quiet > $R/B.log 2>&1
date >> $R/A0.time
echo finished >> $R/A0.time
