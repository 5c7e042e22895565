"""Aggregate decode throughput, TTFT and time per output token of the engine at 1, 8, 32 concurrent requests.

    .venv/bin/python benchmarks/engine_concurrency.py ARTIFACT [--concurrency 1 8 32] [--prompt-len 32]
        [--gen-len 64] [--threads 1] [--deterministic] [--check-invariance] [--json out.json]

All requests of a level are submitted at once (greedy, EOS ignored, random prompt ids with a
fixed seed, no shared prefixes). Aggregate decode tok/s = generated tokens / wall time from the
first submission to the last completion. TTFT is measured per request from its submission;
TPOT is each request's decode time / (tokens - 1). ``--check-invariance`` also reports whether
the 32 batched greedy outputs equal each request run alone (in the chosen mode).
"""

from __future__ import annotations

import argparse
import json
import platform
import time

import numpy as np

from llmc.runtime.engine import Engine
from llmc.runtime.sampling import SamplingParams


def pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q)) if values else 0.0


def prompts_for(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [[int(t) for t in rng.integers(3, vocab, size=length)] for _ in range(n)]


def run_level(engine: Engine, n: int, prompt_len: int, gen_len: int, seed: int) -> dict[str, float]:
    prompts = prompts_for(n, prompt_len, engine.config.vocab_size, seed)
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    start = time.perf_counter()
    outs = engine.generate(prompts, params)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outs)
    ttft = [o.timings["ttft_s"] for o in outs]
    tpot = [o.timings["tpot_s"] for o in outs]
    return {
        "concurrency": n, "requests": n, "generated_tokens": tokens, "wall_s": wall,
        "aggregate_tok_s": tokens / wall,
        "ttft_p50_s": pct(ttft, 50), "ttft_p95_s": pct(ttft, 95),
        "tpot_p50_s": pct(tpot, 50), "tpot_p95_s": pct(tpot, 95),
    }


def hf_peer_level(model: object, n: int, prompt_len: int, gen_len: int, vocab: int, seed: int) -> dict[str, float]:
    """The same requests as one static batch through transformers ``generate`` (greedy, no EOS)."""
    import torch

    ids = torch.tensor(prompts_for(n, prompt_len, vocab, seed))
    start = time.perf_counter()
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen_len, min_new_tokens=gen_len,
                             do_sample=False, pad_token_id=0)
    wall = time.perf_counter() - start
    tokens = (out.shape[1] - prompt_len) * n
    return {"concurrency": n, "generated_tokens": tokens, "wall_s": wall, "aggregate_tok_s": tokens / wall}


def load_hf_peer(path: str) -> object:
    """A Hugging Face folder, or a GGUF file (dequantized by transformers), in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    if path.endswith(".gguf"):
        import os

        return AutoModelForCausalLM.from_pretrained(os.path.dirname(path) or ".", gguf_file=os.path.basename(path),
                                                    torch_dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path, torch_dtype=torch.float32).eval()


def check_invariance(engine: Engine, n: int, seed: int) -> dict[str, int]:
    """32 greedy requests of different prompt and output lengths, batched vs alone."""
    rng = np.random.default_rng(seed)
    vocab = engine.config.vocab_size
    prompts = [[int(t) for t in rng.integers(3, vocab, size=int(rng.integers(1, 41)))] for _ in range(n)]
    params = [SamplingParams(max_tokens=int(rng.integers(1, 41)), temperature=0, ignore_eos=True) for _ in range(n)]
    together = [o.token_ids for o in engine.generate(prompts, params)]
    alone = [engine.generate([p], q)[0].token_ids for p, q in zip(prompts, params, strict=True)]
    return {"requests": n, "identical": sum(a == b for a, b in zip(together, alone, strict=True))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact")
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--gen-len", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--max-num-tokens", type=int, default=512)
    ap.add_argument("--deterministic", action="store_true")
    ap.add_argument("--check-invariance", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hf-peer", default=None, help="HF folder or GGUF of the same model: transformers static batch")
    ap.add_argument("--json", dest="json_out", default=None)
    args = ap.parse_args()
    engine = Engine.load(args.artifact, max_running=max(args.concurrency), max_num_tokens=args.max_num_tokens,
                         threads=args.threads, deterministic=args.deterministic, prefix_caching=False)
    run_level(engine, 2, args.prompt_len, 4, seed=999)  # warm-up
    rows = [run_level(engine, n, args.prompt_len, args.gen_len, args.seed) for n in args.concurrency]
    base = rows[0]["aggregate_tok_s"]
    print(f"# {args.artifact} deterministic={args.deterministic} threads={args.threads} "
          f"prompt={args.prompt_len} gen={args.gen_len} machine={platform.machine()}")
    print("| concurrent | aggregate tok/s | x single | TTFT p50 / p95 (s) | TPOT p50 / p95 (ms) |")
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['concurrency']} | {r['aggregate_tok_s']:.1f} | {r['aggregate_tok_s'] / base:.2f} | "
              f"{r['ttft_p50_s']:.3f} / {r['ttft_p95_s']:.3f} | "
              f"{r['tpot_p50_s'] * 1e3:.1f} / {r['tpot_p95_s'] * 1e3:.1f} |")
    result = {"artifact": args.artifact, "deterministic": args.deterministic, "threads": args.threads,
              "prompt_len": args.prompt_len, "gen_len": args.gen_len, "levels": rows}
    if args.check_invariance:
        result["invariance"] = check_invariance(engine, 32, args.seed)
        print(f"batched == alone for {result['invariance']['identical']}/32 greedy requests")
    engine.close()
    if args.hf_peer:
        import torch

        if args.threads:
            torch.set_num_threads(args.threads)
        model = load_hf_peer(args.hf_peer)
        hf_peer_level(model, 1, args.prompt_len, 2, engine.config.vocab_size, 999)  # warm-up
        peer = [hf_peer_level(model, n, args.prompt_len, args.gen_len, engine.config.vocab_size, args.seed)
                for n in args.concurrency]
        result["hf_peer"] = peer
        print("| concurrent | transformers static batch tok/s | x single |")
        print("|---:|---:|---:|")
        for r in peer:
            ratio = r["aggregate_tok_s"] / peer[0]["aggregate_tok_s"]
            print(f"| {r['concurrency']} | {r['aggregate_tok_s']:.1f} | {ratio:.2f} |")
    if args.json_out:
        with open(args.json_out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
