"""What a benchmark drives: a :class:`Backend` runs a static batch or concurrent requests.

llmc's own backend is here; peers (llama.cpp, transformers, ONNX Runtime GenAI) implement the
same interface in ``benchmarks/peer_engines/`` (run by ``benchmarks/peers.py``), so every engine
is timed by the same harness with the same prompts. All decoding is greedy and ignores EOS, so
every sequence produces exactly ``gen_len`` tokens.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.errors import UnsupportedError

Tick = Callable[[], None]


@dataclass
class BatchRun:
    """One static batch: every sequence prefilled together, then decoded in lock-step."""

    batch_size: int
    prefill_s: float  # start to the first token of every sequence
    step_s: list[float]  # each later decode step (one token per sequence)
    total_s: float
    output_tokens: int  # per sequence
    token_ids: list[list[int]] | None = None  # the greedy tokens of each sequence (for cross-checks)


@dataclass
class RequestRun:
    """One request of a concurrent run, timed from its submission."""

    ttft_s: float
    e2e_s: float
    output_tokens: int
    token_ids: list[int] | None = None


@dataclass
class BackendInfo:
    """What the report says about an engine."""

    engine: str
    label: str
    version: str | None
    weight_bytes: int  # all weights as stored
    weight_bytes_per_step: int  # weights read by one decode step (embedding: one row per sequence)
    embed_row_bytes: int = 0
    threads: int | None = None
    device: str = "cpu"
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine, "label": self.label, "version": self.version,
            "weight_bytes": self.weight_bytes, "weight_bytes_per_step": self.weight_bytes_per_step,
            "embed_row_bytes": self.embed_row_bytes, "threads": self.threads, "device": self.device,
            "details": self.details,
        }


class Backend(ABC):
    """An engine under test."""

    @abstractmethod
    def info(self) -> BackendInfo:
        """Engine name, label, version and weight sizes."""

    @abstractmethod
    def run_batch(self, prompts: list[list[int]], gen_len: int) -> BatchRun:
        """Prefill ``prompts`` together and decode ``gen_len`` tokens each, greedily."""

    def run_concurrent(self, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
        """Submit ``prompts`` as simultaneous requests; one :class:`RequestRun` per prompt."""
        raise UnsupportedError(f"{self.info().label} has no concurrent-request mode")

    def gpu_peak_bytes(self) -> int | None:
        return None

    def close(self) -> None:  # noqa: B027 - optional hook, most backends hold nothing to free
        """Free what the backend holds."""


def weight_bytes_per_step(params: dict[str, dict[str, Any]], batch: int = 1) -> tuple[int, int, int]:
    """(total, per decode step, embedding row) bytes from an artifact manifest's ``params``.

    A decode step reads every weight once, except the embedding table, of which it reads one
    row per sequence; a tied head is a separate ``lm_head`` param that is read in full."""
    total = sum(int(r.get("bytes", 0)) for r in params.values())
    embed = params.get("embed")
    row = 0
    per_step = total
    if embed is not None and "lm_head" in params:
        rows = int(embed["shape"][0]) or 1
        row = int(embed.get("bytes", 0)) // rows
        per_step = total - int(embed.get("bytes", 0)) + batch * row
    return total, per_step, row


class LlmcBackend(Backend):
    """A compiled llmc artifact: static batches on its executor, concurrency on the Engine."""

    def __init__(self, artifact: str | Path, threads: int | None = None, device: str | None = None,
                 engine_config: dict[str, Any] | None = None, name: str | None = None) -> None:
        """``name`` goes in the label, ``llmc/TARGET:NAME`` (default: the artifact's folder name)."""
        from llmc.runtime.loader import load_model

        self.path = Path(artifact)
        self.name = name or self.path.resolve().name
        self.model = load_model(self.path, threads=threads, device=device)
        self.artifact = self.model.artifact
        self.threads = threads
        self.device = device
        self.executor = self.model.executor
        self.engine_config = dict(engine_config or {})
        self._engine: Any = None
        self._engine_key: tuple[int, int] | None = None

    def info(self) -> BackendInfo:
        from llmc.compiler.version import __version__
        from llmc.runtime.inspect import weight_types

        m = self.artifact.manifest
        total, per_step, row = weight_bytes_per_step(m["params"])
        types = weight_types(m["params"])
        return BackendInfo(
            engine="llmc",
            label=f"llmc/{self.artifact.target}:{self.name}",
            version=__version__,
            weight_bytes=total,
            weight_bytes_per_step=per_step,
            embed_row_bytes=row,
            threads=self.threads,
            device=str(self.executor.device),
            details={"artifact": str(self.path), "target": self.artifact.target,
                     "target_options": m["target"].get("options", {}), "weight_types": types,
                     "opt_level": m.get("pipeline", {}).get("opt_level"), "source": m["source"].get("path")},
        )

    # -- static batches on the executor (greedy steps through launch: only token ids come back) --
    def _tables(self, batch: int, tokens: int) -> list[list[int]]:
        from llmc.runtime.loader import kv_blocks_for

        blocks = kv_blocks_for(self.executor.kv_spec(), batch, tokens)
        self.executor.init_cache(blocks)
        per_seq = blocks // batch
        return [list(range(j * per_seq, (j + 1) * per_seq)) for j in range(batch)]

    def run_batch(self, prompts: list[list[int]], gen_len: int) -> BatchRun:
        self.close()  # an engine would share this executor's cache
        from llmc.compiler.ir.batch import BatchLayout
        from llmc.runtime.executor import StepBatch
        from llmc.runtime.sampling import SampleRow, SamplingParams

        batch = len(prompts)
        lens = tuple(len(p) for p in prompts)
        tables = self._tables(batch, max(lens) + gen_len)
        seqs = tuple(range(batch))
        ids = np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])
        greedy = [SampleRow(SamplingParams(temperature=0.0))] * batch  # argmax, on the executor's side
        start = time.perf_counter()
        layout = BatchLayout(seqs, lens, lens)
        prefill = StepBatch(ids, layout, tables, layout.last_token_rows())
        tokens = self.executor.launch(prefill, greedy).result().token_ids
        first = time.perf_counter()
        out = [tokens]
        steps: list[float] = []
        ctx = list(lens)
        for _ in range(gen_len - 1):
            t0 = time.perf_counter()
            ctx = [c + 1 for c in ctx]
            layout = BatchLayout(seqs, (1,) * batch, tuple(ctx))
            step = StepBatch(tokens, layout, tables, np.arange(batch))
            tokens = self.executor.launch(step, greedy).result().token_ids
            out.append(tokens)
            steps.append(time.perf_counter() - t0)
        end = time.perf_counter()
        ids = np.stack(out, axis=1).tolist()
        return BatchRun(batch, first - start, steps, end - start, gen_len, ids)

    # -- concurrent requests on the engine ----------------------------------------------
    def run_concurrent(self, prompts: list[list[int]], gen_len: int) -> list[RequestRun]:
        """All prompts submitted at once to a continuous-batching Engine with one slot each
        (``max_running`` = the number of prompts); the engine reuses this executor.

        Unless ``engine_config`` sizes it, the KV cache holds exactly what the requests need (as
        llama.cpp's ``n_ctx`` = slots x length), not the Engine's default of at least one
        full-context sequence (8 GiB for Llama-3.2-1B's 131,072 positions)."""
        from llmc.runtime.bench.concurrency import run_engine_requests
        from llmc.runtime.engine import Engine, EngineConfig

        slots = len(prompts)
        length = max(len(p) for p in prompts) + gen_len
        key = (slots, length)
        if self._engine is None or self._engine_key != key:
            self.close()
            config: dict[str, Any] = {"max_running": slots, **self.engine_config}
            if "num_blocks" not in config and "kv_memory" not in config:
                from llmc.runtime.loader import kv_blocks_for

                config["num_blocks"] = kv_blocks_for(self.executor.kv_spec(), slots, length)
            self._engine = Engine(self.executor, self.model.tokenizer, EngineConfig.from_kwargs(**config))
            self._engine_key = key
        return run_engine_requests(self._engine, prompts, gen_len)

    def gpu_peak_bytes(self) -> int | None:
        """Peak GPU memory, where the executor's allocator can tell (the torch target's on CUDA)."""
        return self.executor.device_peak_bytes()

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
        self._engine = None
        self._engine_key = None

