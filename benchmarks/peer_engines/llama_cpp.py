"""llama.cpp through llama-cpp-python's C API: one context with ``n_seq_max`` = batch size, a
unified KV cache, all prompts decoded in one batch (chunks of ``n_batch`` tokens), then one token
per sequence per ``llama_decode``: what ``llama-server -np N`` does with N requests arriving
together (minus HTTP)."""

from __future__ import annotations

import time

import numpy as np

from llmc.errors import LlmcError, UnsupportedError
from llmc.runtime.bench import BackendInfo, BatchRun

from .common import StaticBatchBackend, package_version


class LlamaCppBackend(StaticBatchBackend):
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
        version = package_version("llama-cpp-python") or getattr(self.ll, "__version__", None)
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


    def close(self) -> None:
        ll = self.ll
        ll.llama_batch_free(self.batch)
        ll.llama_free(self.ctx)
        ll.llama_model_free(self.model)
