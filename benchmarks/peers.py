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
request arriving at once (for llama.cpp this is exactly its parallel-slot decoding).
All engines decode greedily and ignore EOS, so each sequence makes exactly ``--gen-len`` tokens;
the report records, per engine, whether its greedy tokens equal the first llmc engine's.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmc.errors import LlmcError, UnsupportedError
from llmc.runtime.bench import (
    Backend,
    BackendInfo,
    BatchRun,
    BenchSettings,
    LlmcBackend,
    RequestRun,
    make_prompts,
    markdown_table,
    new_report,
    parse_sizes,
    progress_bar,
    validate,
    write_outputs,
)
from llmc.runtime.bench.harness import run_backend

PEER_ENGINES = ("llama.cpp", "hf-eager", "hf-compile", "ort-genai")


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


# -- llama.cpp ------------------------------------------------------------------------------------
class LlamaCppBackend(Backend):
    """A GGUF through llama.cpp's C API (llama-cpp-python), with up to ``max_seqs`` parallel sequences."""

    def __init__(self, gguf: str, threads: int, max_seqs: int, max_len: int, n_batch: int = 512) -> None:
        try:
            import llama_cpp
        except ImportError as exc:
            raise UnsupportedError(f"llama.cpp peer needs llama-cpp-python (the `peers` extra): {exc}") from exc
        self.ll = llama_cpp
        self.path = gguf
        self.threads = threads
        self.n_batch = n_batch
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(gguf.encode(), mparams)
        if not self.model:
            raise LlmcError(f"llama.cpp could not load {gguf}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = max_seqs * max_len
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = max_seqs
        cparams.n_threads = threads
        cparams.n_threads_batch = threads
        if hasattr(cparams, "kv_unified"):
            cparams.kv_unified = True
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            raise LlmcError(f"llama.cpp could not create a context of {cparams.n_ctx} tokens")
        self.max_seqs = max_seqs
        self.batch = llama_cpp.llama_batch_init(max(n_batch, max_seqs), 0, max_seqs)

    def info(self) -> BackendInfo:
        import gguf

        reader = gguf.GGUFReader(self.path)
        sizes = {t.name: int(t.n_bytes) for t in reader.tensors}
        total = sum(sizes.values())
        embed = next(t for t in reader.tensors if t.name == "token_embd.weight")
        row = int(embed.n_bytes) // int(embed.shape[-1])
        per_step = total if "output.weight" not in sizes else total - sizes["token_embd.weight"] + row
        types = sorted({t.tensor_type.name for t in reader.tensors})
        version = _version("llama-cpp-python") or getattr(self.ll, "__version__", None)
        return BackendInfo("llama.cpp", "llama.cpp", version, total, per_step, row,
                           self.threads, "cpu", {"gguf": self.path, "tensor_types": types, "n_batch": self.n_batch,
                                                 "slots": self.max_seqs, "kv_unified": True})

    def _clear(self) -> None:
        ll = self.ll
        if hasattr(ll, "llama_memory_clear"):
            ll.llama_memory_clear(ll.llama_get_memory(self.ctx), True)
        else:  # older llama.cpp
            ll.llama_kv_self_clear(self.ctx)

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> np.ndarray:
        """Decode (token, pos, seq, wants_logits) entries in ``n_batch`` chunks; logits of flagged rows."""
        ll, b = self.ll, self.batch
        rows: list[np.ndarray] = []
        for start in range(0, len(entries), self.n_batch):
            chunk = entries[start : start + self.n_batch]
            b.n_tokens = len(chunk)
            for i, (tok, pos, seq, want) in enumerate(chunk):
                b.token[i] = tok
                b.pos[i] = pos
                b.n_seq_id[i] = 1
                b.seq_id[i][0] = seq
                b.logits[i] = want
            rc = ll.llama_decode(self.ctx, b)
            if rc != 0:
                raise LlmcError(f"llama_decode failed with status {rc}")
            n_out = sum(1 for e in chunk if e[3])
            if n_out:
                ptr = ll.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(ptr, shape=(n_out, self.n_vocab)).copy())
        return np.concatenate(rows) if rows else np.empty((0, self.n_vocab), np.float32)

    def run_batch(self, prompts: list[list[int]], gen_len: int) -> BatchRun:
        if len(prompts) > self.max_seqs:
            raise LlmcError(f"{len(prompts)} sequences but the context has {self.max_seqs} slots")
        self._clear()
        start = time.perf_counter()
        entries = [(t, i, j, i == len(p) - 1) for j, p in enumerate(prompts) for i, t in enumerate(p)]
        tokens = self._decode(entries).argmax(axis=-1)
        first = time.perf_counter()
        out, steps = [tokens], []
        for step in range(gen_len - 1):
            t0 = time.perf_counter()
            entries = [(int(tokens[j]), len(p) + step, j, True) for j, p in enumerate(prompts)]
            tokens = self._decode(entries).argmax(axis=-1)
            out.append(tokens)
            steps.append(time.perf_counter() - t0)
        end = time.perf_counter()
        return BatchRun(len(prompts), first - start, steps, end - start, gen_len, np.stack(out, 1).tolist())

    def run_concurrent(self, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
        run = self.run_batch(prompts, gen_len)
        ids = run.token_ids or [None] * len(prompts)
        return [RequestRun(run.prefill_s, run.total_s, gen_len, t) for t in ids]

    def close(self) -> None:
        ll = self.ll
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)


# -- transformers ---------------------------------------------------------------------------------
class HFBackend(Backend):
    """transformers LlamaForCausalLM, eager with a dynamic cache, or (``compile``) static cache +
    ``torch.compile`` of the decode forward."""

    def __init__(self, folder: str, threads: int, dtype: str = "float32", compile: bool = False,
                 device: str = "cpu") -> None:
        import torch
        from transformers import AutoModelForCausalLM

        torch.set_num_threads(threads)
        self.torch = torch
        self.device = device
        self.folder = folder
        self.threads = threads
        self.dtype = dtype
        self.compile = compile
        self.model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, dtype)).to(device).eval()
        # transformers 5.x renamed past_key_values to cache
        self._cache_kw = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        self._decode_fn: Any = self.model.forward
        self._caches: dict[tuple[int, int], Any] = {}
        self._compiled: set[int] = set()
        self.compile_s = 0.0
        if compile:
            self._decode_fn = torch.compile(self.model.forward, dynamic=False)

    def info(self) -> BackendInfo:
        params = {id(p): p for p in self.model.parameters()}
        total = sum(p.numel() * p.element_size() for p in params.values())
        embed = self.model.get_input_embeddings().weight
        row = embed.shape[1] * embed.element_size()
        tied = self.model.get_output_embeddings().weight is embed
        per_step = total + row if tied else total - embed.numel() * embed.element_size() + row
        name = "hf-compile" if self.compile else "hf-eager"
        return BackendInfo(name, name, _version("transformers"), total, per_step, row, self.threads, self.device,
                           {"folder": self.folder, "dtype": self.dtype, "torch": _version("torch"),
                            "compile_s": round(self.compile_s, 2),
                            "cache": "StaticCache + torch.compile(decode)" if self.compile else "DynamicCache"})

    def run_batch(self, prompts: list[list[int]], gen_len: int) -> BatchRun:
        torch = self.torch
        ids = torch.tensor(prompts, dtype=torch.long, device=self.device)
        batch, plen = ids.shape
        sync = torch.cuda.synchronize if self.device.startswith("cuda") else (lambda: None)
        with torch.inference_mode():
            cache, extra = self._cache(batch, plen + gen_len)
            start = time.perf_counter()
            out = self.model(input_ids=ids, use_cache=True, logits_to_keep=1, **{self._cache_kw: cache},
                             **extra(0, plen))
            tokens = out.logits[:, -1].argmax(-1)
            sync()
            first = time.perf_counter()
            cache = getattr(out, self._cache_kw)
            generated, steps = [tokens], []
            for step in range(gen_len - 1):
                t0 = time.perf_counter()
                out = self._decode_fn(input_ids=tokens[:, None], use_cache=True, **{self._cache_kw: cache},
                                      **extra(plen + step, 1))
                tokens = out.logits[:, -1].argmax(-1)
                generated.append(tokens)
                sync()
                steps.append(time.perf_counter() - t0)
                if self.compile and step == 0 and batch not in self._compiled:
                    self._compiled.add(batch)  # the first call at a new shape compiles
                    self.compile_s += steps[-1]
            end = time.perf_counter()
        return BatchRun(batch, first - start, steps, end - start, gen_len, torch.stack(generated, 1).tolist())

    def _cache(self, batch: int, length: int) -> tuple[Any, Any]:
        torch = self.torch
        if not self.compile:
            return None, lambda pos, n: {}
        from transformers import StaticCache

        key = (batch, length)
        if key not in self._caches:
            self._caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
        cache = self._caches[key]
        cache.reset()
        return cache, lambda pos, n: {"cache_position": torch.arange(pos, pos + n, device=self.device)}

    def run_concurrent(self, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
        run = self.run_batch(prompts, gen_len)
        ids = run.token_ids or [None] * len(prompts)
        return [RequestRun(run.prefill_s, run.total_s, gen_len, t) for t in ids]


# -- ONNX Runtime GenAI ---------------------------------------------------------------------------
def build_ort_genai(folder: str, out: Path, precision: str) -> Path:
    """Run the onnxruntime-genai builder on an HF folder (cached in ``out``)."""
    if (out / "genai_config.json").exists():
        return out
    cmd = [sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", folder, "-o", str(out), "-p", precision,
           "-e", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise UnsupportedError(f"onnxruntime-genai builder rejected {folder}: {' | '.join(tail)}")
    return out


class OrtGenaiBackend(Backend):
    """An ONNX Runtime GenAI model folder, ``og.Generator`` per batch."""

    def __init__(self, folder: Path, threads: int, precision: str) -> None:
        try:
            import onnxruntime_genai as og
        except ImportError as exc:
            raise UnsupportedError(f"ort-genai peer needs onnxruntime-genai (the `peers` extra): {exc}") from exc
        self.og = og
        self.folder = folder
        self.threads = threads
        self.precision = precision
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {
            "intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
        self.model = og.Model(config)

    def info(self) -> BackendInfo:
        import onnx

        model = onnx.load(str(self.folder / "model.onnx"), load_external_data=False)
        total, embed, row = 0, 0, 0
        for init in model.graph.initializer:
            ext = {e.key: e.value for e in init.external_data}
            size = int(ext["length"]) if "length" in ext else len(init.raw_data)
            total += size
            if "embed_tokens" in init.name:
                embed, row = size, size // int(init.dims[0])
        return BackendInfo("ort-genai", f"ort-genai/{self.precision}", _version("onnxruntime-genai"), total,
                           total - embed + row, row, self.threads, "cpu",
                           {"folder": str(self.folder), "precision": self.precision,
                            "onnxruntime": _version("onnxruntime")})

    def run_batch(self, prompts: list[list[int]], gen_len: int) -> BatchRun:
        og = self.og
        ids = np.asarray(prompts, dtype=np.int32)
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + gen_len, do_sample=False, batch_size=ids.shape[0])
        gen = og.Generator(self.model, params)
        start = time.perf_counter()
        gen.append_tokens(ids)
        gen.generate_next_token()  # samples from the prefill logits
        generated = [gen.get_next_tokens().copy()]
        first = time.perf_counter()
        steps = []
        for _ in range(gen_len - 1):
            t0 = time.perf_counter()
            gen.generate_next_token()  # runs the model on the last token, then samples
            generated.append(gen.get_next_tokens().copy())
            steps.append(time.perf_counter() - t0)
        end = time.perf_counter()
        return BatchRun(ids.shape[0], first - start, steps, end - start, gen_len,
                        np.stack(generated, 1).tolist())

    def run_concurrent(self, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
        run = self.run_batch(prompts, gen_len)
        ids = run.token_ids or [None] * len(prompts)
        return [RequestRun(run.prefill_s, run.total_s, gen_len, t) for t in ids]


# -- one engine per process -----------------------------------------------------------------------
def make_backend(spec: dict[str, Any]) -> Backend:
    engine, s = spec["engine"], spec["settings"]
    threads = int(s["threads"])
    if engine.startswith("llmc:"):
        return LlmcBackend(engine.split(":", 1)[1], threads=threads, device=spec.get("device"))
    if engine == "llama.cpp":
        sizes = [2]  # the greedy probe runs two sequences
        if "batch" in s["scenarios"]:
            sizes += s["batch_sizes"]
        if "concurrency" in s["scenarios"]:
            sizes += s["concurrency"]
        return LlamaCppBackend(spec["gguf"], threads, max(sizes), s["prompt_len"] + s["gen_len"])
    if engine in ("hf-eager", "hf-compile"):
        return HFBackend(spec["hf"], threads, spec.get("hf_dtype", "float32"), compile=engine == "hf-compile",
                         device=spec.get("device") or "cpu")
    if engine == "ort-genai":
        folder = build_ort_genai(spec["hf"], Path(spec["work_dir"]) / f"ort-genai-{spec['ort_precision']}",
                                 spec["ort_precision"])
        return OrtGenaiBackend(folder, threads, spec["ort_precision"])
    raise LlmcError(f"unknown engine {engine!r}; choose from llmc:PATH, {', '.join(PEER_ENGINES)}")


def worker(spec_path: Path, out_path: Path) -> None:
    """Run one engine over every point and write ``{info, rows, tokens}`` (or ``{error}``)."""
    spec = json.loads(spec_path.read_text())
    s = spec["settings"]
    settings = BenchSettings(scenarios=tuple(s["scenarios"]), batch_sizes=tuple(s["batch_sizes"]),
                             concurrency=tuple(s["concurrency"]), prompt_len=s["prompt_len"], gen_len=s["gen_len"],
                             warmup=s["warmup"], repeat=s["repeat"], seed=s["seed"], threads=s["threads"])
    try:
        backend = make_backend(spec)
    except Exception as exc:
        out_path.write_text(json.dumps({"error": f"{type(exc).__name__}: {exc}"}))
        return
    # greedy tokens of one fixed batch, to check that every engine runs the same model
    probe = make_prompts(2, settings.prompt_len, spec["vocab_size"], settings.seed, 10_000)
    try:
        tokens = backend.run_batch(probe, min(settings.gen_len, 8)).token_ids
    except Exception as exc:
        tokens = None
        print(f"probe failed: {exc}", file=sys.stderr)
    advance, close = progress_bar(len(settings.points()) * (settings.warmup + settings.repeat), spec.get("quiet"))
    try:
        info, rows = run_backend(backend, settings, spec["vocab_size"], spec["bandwidth"], advance)
    finally:
        close()
    info = backend.info()  # after the runs: includes compile time
    backend.close()
    out_path.write_text(json.dumps({"info": info.to_dict(), "rows": rows, "tokens": tokens}))


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
        worker(Path(args.worker[0]), Path(args.worker[1]))
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
