"""Single-sequence generation on any executor (the engine batches many of these)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from llmc.compiler.ir.batch import BatchLayout
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.errors import RequestError
from llmc.runtime.artifact import Artifact
from llmc.runtime.kv_cache import BlockAllocator
from llmc.runtime.sampling import SamplingParams, sample_token
from llmc.targets.base import Executor, StepBatch
from llmc.targets.registry import get_target


@dataclass
class LoadedModel:
    artifact: Artifact
    executor: Executor
    tokenizer: LlmcTokenizer | None

    @property
    def eos_ids(self) -> set[int]:
        ids = set(self.executor.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.meta.eos_token_ids)
        return ids


def load_model(path: str, verify: bool = True, **options: object) -> LoadedModel:
    """Load an artifact and its executor."""
    artifact = Artifact.load(path, verify=verify)
    executor = get_target(artifact.target).load(artifact, **options)
    return LoadedModel(artifact, executor, artifact.tokenizer())


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)


def generate_ids(model: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
    """Prefill ``prompt_ids`` then decode until EOS, a stop token or ``max_tokens``."""
    executor = model.executor
    config = executor.config
    if not prompt_ids:
        raise RequestError("the prompt is empty")
    if len(prompt_ids) + params.max_tokens > config.max_position:
        raise RequestError(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the context "
            f"of {config.max_position} tokens"
        )
    bad = [t for t in prompt_ids if not 0 <= t < config.vocab_size]
    if bad:
        raise RequestError(f"token ids {bad[:5]} are outside the vocabulary of {config.vocab_size}")
    spec = executor.kv_spec()
    total = len(prompt_ids) + params.max_tokens
    allocator = BlockAllocator(max(1, -(-total // spec.block_size)), spec.block_size)
    executor.init_cache(allocator.num_blocks)
    table: list[int] = []
    rng = np.random.default_rng(params.seed)
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else model.eos_ids)

    start = time.perf_counter()
    allocator.grow(table, len(prompt_ids))
    n = len(prompt_ids)
    batch = StepBatch(np.asarray(prompt_ids), BatchLayout((0,), (n,), (n,)), [table], [n - 1])
    logits = executor.step(batch)[0]
    first = time.perf_counter()
    out: list[int] = []
    finish = "length"
    context = n
    while True:
        token = sample_token(logits, params, rng)
        out.append(token)
        if token in stops:
            finish = "stop"
            break
        if len(out) >= params.max_tokens:
            break
        context += 1
        allocator.grow(table, context)
        batch = StepBatch(np.asarray([token]), BatchLayout((0,), (1,), (context,)), [table], [0])
        logits = executor.step(batch)[0]
    end = time.perf_counter()
    decode_steps = max(len(out) - 1, 1)
    return GenerationResult(
        prompt_token_ids=list(prompt_ids),
        token_ids=out,
        finish_reason=finish,
        timings={
            "prefill_s": first - start,
            "decode_s": end - first,
            "total_s": end - start,
            "prefill_tok_s": n / max(first - start, 1e-9),
            "decode_tok_s": decode_steps / max(end - first, 1e-9),
        },
    )
