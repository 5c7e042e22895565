"""One-prompt generation: a thin wrapper over :class:`~llmc.runtime.engine.Engine` with a KV
cache sized for exactly that request."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.loader import LoadedModel, kv_blocks_for
from llmc.runtime.sampling import SamplingParams


@dataclass
class GenerationResult:
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    timings: dict[str, float] = field(default_factory=dict)


def generate_ids(model: LoadedModel, prompt_ids: list[int], params: SamplingParams) -> GenerationResult:
    """Generate from ``prompt_ids`` until EOS, a stop token or ``max_tokens`` (one request on an engine)."""
    max_tokens = params.max_new_tokens(len(prompt_ids), model.executor.config.max_position)
    blocks = kv_blocks_for(model.executor.kv_spec(), 1, len(prompt_ids) + max(max_tokens, 0))
    config = EngineConfig(max_running=1, num_blocks=blocks, prefix_caching=False)
    with Engine(model.executor, model.tokenizer, config) as engine:
        out = engine.generate([list(prompt_ids)], params)[0]
    return GenerationResult(out.prompt_token_ids, out.token_ids, out.finish_reason, out.timings)
