"""Loading an artifact, and one-prompt generation (a thin wrapper over :class:`~llmc.runtime.engine.Engine`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.artifact import Artifact
from llmc.runtime.sampling import SamplingParams
from llmc.targets.base import Executor
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
    """Generate from ``prompt_ids`` until EOS, a stop token or ``max_tokens`` (one request on an engine)."""
    from llmc.runtime.engine import Engine, EngineConfig

    spec = model.executor.kv_spec()
    blocks = 1 if spec.layout == "slots" else max(1, -(-(len(prompt_ids) + params.max_tokens) // spec.block_size))
    config = EngineConfig(max_running=1, num_blocks=blocks, prefix_caching=False)
    with Engine(model.executor, model.tokenizer, config) as engine:
        out = engine.generate([list(prompt_ids)], params)[0]
    return GenerationResult(out.prompt_token_ids, out.token_ids, out.finish_reason, out.timings)
