"""How many sequences fit: weights, KV bytes per token and a memory budget, before anything is loaded.

``llmc compile`` prints one line of it and ``llmc inspect`` a table (``--memory``, ``--seq-lens``);
``Engine.load(gpu_memory_utilization=...)`` sizes its KV cache with the same :func:`activation_reserve`.

A budget holds the weights (as stored in the artifact; the torch target keeps quantized weights
packed), the activations and workspaces of one step (:func:`activation_reserve`) and the KV
cache; a sequence of ``n`` tokens holds ``ceil(n / block_size)`` blocks of ``block_size`` tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from llmc.compiler.config import ModelConfig

if TYPE_CHECKING:
    from llmc.runtime.artifact import Artifact

RUNTIME_OVERHEAD_BYTES = 256 << 20
"""Fixed workspace of a step beyond its activations (library workspaces, graph pools, allocator slack)."""
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2, "float64": 8, "int8": 1, "float8": 1}


def kv_bytes_per_token(config: ModelConfig, kv_dtype: str) -> int:
    """Keys and values of one token over all layers."""
    return 2 * config.num_layers * config.num_kv_heads * config.head_dim * DTYPE_BYTES.get(kv_dtype, 4)


def activation_reserve(config: ModelConfig, max_num_tokens: int, max_rows: int) -> int:
    """Bytes a step needs besides weights and KV: ``max_num_tokens`` tokens of activations (float32
    bound: the hidden state and its temporaries, the MLP's gate, up and product), logits and the
    sampler's float64 copies for ``max_rows`` sampled rows, and :data:`RUNTIME_OVERHEAD_BYTES`."""
    per_token = (6 * config.hidden_size + 3 * config.intermediate_size) * 4
    return RUNTIME_OVERHEAD_BYTES + max_num_tokens * per_token + max_rows * config.vocab_size * 16


@dataclass(frozen=True)
class Capacity:
    """What fits in ``memory_bytes``."""

    weight_bytes: int
    kv_bytes_per_token: int
    block_size: int
    memory_bytes: int
    reserve_bytes: int
    context_length: int

    @property
    def kv_budget_bytes(self) -> int:
        return max(0, self.memory_bytes - self.weight_bytes - self.reserve_bytes)

    def sequences(self, length: int) -> int:
        """Concurrent sequences of ``length`` tokens (prompt + output) the KV budget holds."""
        per_seq = -(-length // self.block_size) * self.block_size * self.kv_bytes_per_token
        return self.kv_budget_bytes // per_seq

    def tokens(self) -> int:
        """KV cache positions the budget holds in all."""
        return self.kv_budget_bytes // self.kv_bytes_per_token // self.block_size * self.block_size

    def to_dict(self, lengths: list[int]) -> dict[str, Any]:
        return {"memory_bytes": self.memory_bytes, "weight_bytes": self.weight_bytes,
                "reserve_bytes": self.reserve_bytes, "kv_budget_bytes": self.kv_budget_bytes,
                "kv_bytes_per_token": self.kv_bytes_per_token, "block_size": self.block_size,
                "kv_tokens": self.tokens(), "context_length": self.context_length,
                "sequences": {str(n): self.sequences(n) for n in lengths}}

    def line(self, length: int) -> str:
        """One sentence: weights, KV per token, and how many ``length``-token sequences fit."""
        return (f"capacity: weights {fmt_bytes(self.weight_bytes)}, KV {fmt_bytes(self.kv_bytes_per_token)}/token; "
                f"in {fmt_bytes(self.memory_bytes)} ({fmt_bytes(self.reserve_bytes)} for activations): "
                f"{self.sequences(length)} sequences of {length} tokens ({self.tokens()} KV tokens)")

    def table(self, lengths: list[int]) -> str:
        lines = [f"capacity     {fmt_bytes(self.memory_bytes)}: weights {fmt_bytes(self.weight_bytes)}, activations "
                 f"{fmt_bytes(self.reserve_bytes)}, KV {fmt_bytes(self.kv_budget_bytes)} "
                 f"({fmt_bytes(self.kv_bytes_per_token)}/token, {self.tokens()} tokens)"]
        lines += [f"  {n:>8} tokens/sequence: {self.sequences(n):>7} concurrent" for n in lengths]
        return "\n".join(lines)


def fmt_bytes(n: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


def default_lengths(context_length: int) -> list[int]:
    """Sequence lengths a report shows: 512, 2048, 8192 and the whole context (those within it)."""
    return sorted({n for n in (512, 2048, 8192) if n < context_length} | {context_length})


def artifact_capacity(artifact: Artifact, memory_bytes: int, max_num_tokens: int = 512, max_rows: int = 256,
                      ) -> Capacity:
    """The :class:`Capacity` of an artifact in ``memory_bytes`` (its target says the KV layout)."""
    from llmc.runtime.registry import get_target

    config = artifact.config
    weights = sum(int(r.get("bytes", 0)) for r in artifact.manifest["params"].values())
    per_token, block = get_target(artifact.target).kv_layout(artifact)
    return Capacity(weights, per_token, block, memory_bytes, activation_reserve(config, max_num_tokens, max_rows),
                    config.max_position)
