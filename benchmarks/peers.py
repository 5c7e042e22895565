#!/usr/bin/env python
"""llmc beside the tools people would use instead, on the same model, prompts, lengths and threads.

    python benchmarks/peers.py --name smollm2-135m --gguf model.gguf --llmc out/smol \\
        --engines llama.cpp --scenario single,batch --batch-sizes 1,8 --prompt-len 64 --gen-len 32 \\
        --json out.json --plot out.png --markdown out.md

Engines (each runs in its own process, so peak RSS and thread settings do not leak between them):

- ``llmc:PATH``    a compiled llmc artifact (``--llmc``, repeatable): static batches on its executor,
                   ``concurrency`` on the continuous-batching Engine with one slot per request.
- ``llama.cpp``    the GGUF through llama-cpp-python's C API: one context with ``n_seq_max`` = batch
                   size, a unified KV cache, all prompts decoded in one batch (chunks of ``n_batch``
                   512 tokens), then one token per sequence per ``llama_decode`` — what
                   ``llama-server -np N`` does with N requests arriving together (minus HTTP).
- ``hf-eager``     transformers ``LlamaForCausalLM``, dynamic cache, eager PyTorch.
- ``hf-compile``   transformers with a ``StaticCache`` and the decode forward under ``torch.compile``
                   (the prefill stays eager; compilation happens in the warm-up runs, whose time is
                   reported in ``details.compile_s``, so ``--warmup`` must be at least 1).
- ``ort-genai``    ONNX Runtime GenAI: the model built from the HF folder with its builder
                   (``--ort-precision``), then ``og.Generator`` with ``batch_size`` = batch size.

Peers have no request queue, so their ``concurrency`` rows are their static batch with every
request arriving at once (for llama.cpp this is exactly its parallel-slot decoding). The peers
are in ``benchmarks/peer_engines/`` (one module each); this script runs each engine in a worker
process (``peer_engines/worker.py``) and merges their results into one report.
All engines decode greedily and ignore EOS, so each sequence makes exactly ``--gen-len`` tokens;
the report records, per engine, whether its greedy tokens equal the first llmc engine's.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from llmc.errors import LlmcError
from llmc.runtime.bench import BenchSettings, markdown_table, new_report, parse_sizes, validate, write_outputs

if str(Path(__file__).resolve().parent) not in sys.path:  # loaded by path (tests), not run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parent))
from peer_engines import PEER_ENGINES, HFBackend, LlamaCppBackend, OrtGenaiBackend, make_backend
from peer_engines.worker import run_worker

__all__ = ["PEER_ENGINES", "HFBackend", "LlamaCppBackend", "OrtGenaiBackend", "main", "make_backend"]


def _vocab_size(args: argparse.Namespace) -> int:
    if args.llmc:
        from llmc.runtime.artifact import Artifact

        return Artifact.load(args.llmc[0], verify=False).config.vocab_size
    if args.hf:
        return int(json.loads((Path(args.hf) / "config.json").read_text())["vocab_size"])
    if args.gguf:
        import gguf

        reader = gguf.GGUFReader(args.gguf)
        return len(reader.fields["tokenizer.ggml.tokens"].data)
    raise LlmcError("give at least one of --llmc, --hf or --gguf")


def _model_summary(args: argparse.Namespace, vocab: int) -> dict[str, Any]:
    if args.llmc:
        from llmc.runtime.artifact import Artifact
        from llmc.runtime.bench import model_summary

        summary = model_summary(Artifact.load(args.llmc[0], verify=False))
    else:
        summary = {"vocab_size": vocab, "num_layers": 0, "hidden_size": 0}
    summary["name"] = args.name
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", nargs=2, metavar=("SPEC", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--name", default="model", help="Model name for the report.")
    parser.add_argument("--llmc", action="append", default=[], help="llmc artifact (repeatable).")
    parser.add_argument("--gguf", help="GGUF for llama.cpp.")
    parser.add_argument("--hf", help="Hugging Face folder for transformers and ort-genai.")
    parser.add_argument("--engines", default="llama.cpp,hf-eager", help=f"Peers: {', '.join(PEER_ENGINES)}.")
    parser.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", help="Device for llmc and transformers (e.g. cuda; default: as compiled / cpu).")
    parser.add_argument("--ort-precision", default="int4", choices=["int4", "fp32", "fp16"])
    parser.add_argument("--work-dir", default=str(Path.home() / ".cache" / "llmc" / "peers"))
    parser.add_argument("--scenario", default="single")
    parser.add_argument("--batch-sizes", default="1,8")
    parser.add_argument("--concurrency", default="1,8")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--gen-len", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--json", dest="json_out")
    parser.add_argument("--plot", dest="plot_out")
    parser.add_argument("--markdown", dest="md_out")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    if args.worker:
        run_worker(Path(args.worker[0]), Path(args.worker[1]))
        return 0

    settings = BenchSettings(
        scenarios=tuple(s for s in args.scenario.split(",") if s),
        batch_sizes=parse_sizes(args.batch_sizes, "--batch-sizes"),
        concurrency=parse_sizes(args.concurrency, "--concurrency"), prompt_len=args.prompt_len, gen_len=args.gen_len,
        warmup=args.warmup, repeat=args.repeat, seed=args.seed, threads=args.threads)
    vocab = _vocab_size(args)
    command = [sys.argv[0], *(argv if argv is not None else sys.argv[1:])]
    report = new_report(settings, _model_summary(args, vocab), args.threads, command=command, device=args.device)
    engines = [f"llmc:{p}" for p in args.llmc] + [e for e in args.engines.split(",") if e]
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    reference: list[list[int]] | None = None
    for engine in engines:
        spec = {"engine": engine, "settings": settings.to_dict(), "vocab_size": vocab, "gguf": args.gguf,
                "hf": args.hf, "hf_dtype": args.hf_dtype, "device": args.device, "ort_precision": args.ort_precision,
                "work_dir": args.work_dir, "bandwidth": report.bandwidth["bytes_per_s"] if report.bandwidth else None,
                "quiet": args.quiet}
        spec_path = Path(args.work_dir) / "spec.json"
        out_path = Path(args.work_dir) / "result.json"
        spec_path.write_text(json.dumps(spec))
        out_path.unlink(missing_ok=True)
        print(f"== {engine}", file=sys.stderr, flush=True)
        proc = subprocess.run([sys.executable, __file__, "--worker", str(spec_path), str(out_path)], check=False)
        if not out_path.exists():
            report.notes.append(f"{engine}: worker exited with status {proc.returncode} and no result")
            continue
        result = json.loads(out_path.read_text())
        if "error" in result:
            report.notes.append(f"{engine}: not run: {result['error']}")
            continue
        info = result["info"]
        if result.get("tokens") is not None:
            if reference is None:
                reference = result["tokens"]
                info["details"]["greedy_reference"] = True
            else:
                info["details"]["greedy_matches_reference"] = result["tokens"] == reference
        report.backends.append(info)
        report.results.extend(result["rows"])
    report.notes.append(f"load average at the end: {list(os.getloadavg())}")
    data = report.to_dict()
    validate(data)
    write_outputs(data, args.json_out, args.plot_out)
    table = markdown_table(data["results"])
    if args.md_out:
        Path(args.md_out).write_text(table + "\n")
    print(table)
    for note in data["notes"]:
        print(f"note: {note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
