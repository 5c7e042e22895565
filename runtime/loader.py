"""The runtime spine: artifact -> executor (through the target registry), and how big its KV
cache is. :meth:`Engine.load <llmc.runtime.engine.Engine.load>`, ``llmc run``, ``llmc eval``
and ``llmc bench`` all load through :func:`load_model`, and size caches with :func:`kv_blocks`,
:func:`kv_blocks_for` or :func:`kv_cache_for` (the only places that know how)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmc.compiler.errors import ArtifactError, LlmcError, UnsupportedError
from llmc.compiler.tokenizer import LlmcTokenizer
from llmc.runtime.artifact import MANIFEST, Artifact
from llmc.runtime.executor import Executor, KVSpec
from llmc.runtime.kv_cache import KVCacheManager, PagedKVCache, SlotKVCache
from llmc.runtime.registry import get_target
from llmc.runtime.target import Capabilities, Target, check_options

DEFAULT_KV_BYTES = 1 << 30
"""Default KV budget: enough for ``max_running`` full-context sequences, but at most this (even when
one full-context sequence needs more: the cache is then shorter than the context)."""


@dataclass
class LoadedModel:
    """A verified artifact, its executor, its tokenizer and its target's capabilities."""

    artifact: Artifact
    executor: Executor
    tokenizer: LlmcTokenizer | None
    capabilities: Capabilities

    @property
    def eos_ids(self) -> set[int]:
        ids = set(self.executor.config.eos_token_ids)
        if self.tokenizer is not None:
            ids |= set(self.tokenizer.meta.eos_token_ids)
        return ids


def load_model(path: str | Path | Artifact, *, verify: bool = True, device: str | None = None,
               threads: int | None = None, block_size: int | None = None, deterministic: bool = False,
               **target_options: Any) -> LoadedModel:
    """Load (and by default verify) an artifact and its executor.

    Unset options keep the artifact's own choice. Before anything loads, these are refused with
    a clear error: a device the target does not build for, ``threads`` below 1, ``deterministic``
    on a target without a batch-invariant mode, and options the target does not take
    (:attr:`~llmc.runtime.target.Target.load_options`; ``block_size`` is one of them).
    """
    artifact = path if isinstance(path, Artifact) else Artifact.load(path, verify=verify)
    target = get_target(artifact.target)
    caps = target.capabilities()
    check_saved_options(artifact, target)
    if device is not None:
        caps.device_kind(device)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise LlmcError(f"threads must be a positive integer, got {threads!r}")
    if deterministic and not caps.deterministic:
        raise UnsupportedError(f"the {artifact.target} target has no deterministic (batch-invariant) mode; "
                               "use the torch target for deterministic=True")
    extra = {k: v for k, v in {"block_size": block_size, **target_options}.items() if v is not None}
    options: dict[str, Any] = {"device": device, "threads": threads, "deterministic": deterministic or None,
                               **check_options(target, extra, "load")}
    options = {k: v for k, v in options.items() if v is not None}
    executor = target.load(artifact, **options)
    return LoadedModel(artifact, executor, artifact.tokenizer(), caps)


def check_saved_options(artifact: Artifact, target: Target) -> None:
    """The compile options recorded in the manifest (``target.options``) have the declared types and
    values, and its device is one the target builds for (the manifest is not checksummed)."""
    saved = artifact.target_options
    declared = {o.name: o for o in target.compile_options}
    try:
        if "device" in saved:
            target.capabilities().device_kind(saved["device"])
        for key, value in saved.items():
            if key in declared:
                declared[key].parse(value, "recorded")
    except UnsupportedError as exc:
        raise ArtifactError(f"{artifact.path / MANIFEST}: target.options: {exc} (edited manifest? recompile)") from exc


def kv_blocks(spec: KVSpec, max_running: int, *, num_blocks: int | None = None, kv_memory: int | None = None,
              budget: int = DEFAULT_KV_BYTES, max_model_len: int | None = None) -> int:
    """Blocks (or slots) to allocate: ``num_blocks`` if given, else what ``kv_memory`` bytes hold, else
    ``max_running`` sequences of ``max_model_len`` tokens (default: the full context) capped at ``budget``
    bytes.

    The cap holds even when one such sequence does not fit (a long-context model): the cache is then
    smaller than the context, and a request that needs more than the whole cache is refused at
    submission with the numbers (pass ``kv_memory`` or ``num_blocks`` for a larger cache). When the
    sequences running together need more than the cache, the newest are preempted (and recomputed
    later), never failed."""
    for name, value in (("num_blocks", num_blocks), ("kv_memory", kv_memory), ("max_model_len", max_model_len)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise LlmcError(f"{name} must be a positive integer, got {value!r}")
    if spec.layout == "slots":
        return min(max_running, num_blocks or max_running)
    if num_blocks:
        blocks = num_blocks
    elif kv_memory:
        blocks = int(kv_memory) // spec.bytes_per_block
    else:
        per_seq = spec.max_blocks_per_seq if max_model_len is None else -(-max_model_len // spec.block_size)
        blocks = min(max_running * min(per_seq, spec.max_blocks_per_seq), max(1, budget // spec.bytes_per_block))
    if blocks < 1:
        raise LlmcError(f"kv_memory {kv_memory} is less than one cache block ({spec.bytes_per_block} bytes)")
    return blocks


def kv_memory_from_utilization(executor: Executor, utilization: float, reserve: int) -> int:
    """KV bytes when the process may use ``utilization`` of the device's memory: that share of the total,
    less what is in use now (the weights, the runtime, other processes) and ``reserve`` (a step's
    activations, :func:`~llmc.runtime.capacity.activation_reserve`)."""
    if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
        raise LlmcError(f"gpu_memory_utilization must be a fraction in (0, 1], got {utilization!r}")
    memory = executor.device_memory()
    if memory is None:
        raise LlmcError(f"gpu_memory_utilization needs an executor on a GPU; this one runs on {executor.device}",
                        hint="size the KV cache with kv_memory (llmc serve --kv-cache-memory) instead")
    free, total = memory
    kv = int(utilization * total) - (total - free) - reserve
    if kv <= 0:
        gib = 2**30
        raise LlmcError(f"gpu_memory_utilization {utilization} leaves no room for the KV cache: "
                        f"{utilization * total / gib:.2f} GiB allowed, {(total - free) / gib:.2f} GiB already in use, "
                        f"{reserve / gib:.2f} GiB reserved for activations")
    return kv


def kv_blocks_for(spec: KVSpec, sequences: int, tokens_each: int) -> int:
    """Exactly the blocks (or slots) ``sequences`` sequences of ``tokens_each`` tokens need."""
    if spec.layout == "slots":
        return sequences
    return sequences * max(1, -(-tokens_each // spec.block_size))


def kv_cache_for(executor: Executor, max_running: int, *, num_blocks: int | None = None,
                 kv_memory: int | None = None, prefix_caching: bool = True,
                 gpu_memory_utilization: float | None = None, max_model_len: int | None = None,
                 max_num_tokens: int = 512) -> KVCacheManager:
    """Allocate ``executor``'s cache (sized by :func:`kv_blocks`, or by :func:`kv_memory_from_utilization`
    when ``gpu_memory_utilization`` is given) and return the manager that hands its blocks (or slots) to
    sequences. Prefix caching needs an executor that reads the block tables."""
    from llmc.runtime.capacity import activation_reserve

    spec = executor.kv_spec()
    if gpu_memory_utilization is not None:
        if kv_memory is not None or num_blocks is not None:
            raise LlmcError("give one of gpu_memory_utilization, kv_memory and num_blocks, not several")
        reserve = activation_reserve(executor.config, max_num_tokens, max_running)
        kv_memory = kv_memory_from_utilization(executor, gpu_memory_utilization, reserve)
    blocks = kv_blocks(spec, max_running, num_blocks=num_blocks, kv_memory=kv_memory, max_model_len=max_model_len)
    executor.init_cache(blocks)
    if spec.layout == "slots":  # a slot's block_size is its capacity
        return SlotKVCache(blocks, min(spec.block_size, executor.config.max_position))
    return PagedKVCache(blocks, spec.block_size, prefix_caching=prefix_caching and spec.uses_block_tables)
