"""transformers ``LlamaForCausalLM``: eager PyTorch with a dynamic cache (``hf-eager``), or a
``StaticCache`` with the decode forward under ``torch.compile`` (``hf-compile``)."""

from __future__ import annotations

import inspect
import time
from typing import Any

from llmc.runtime.bench import BackendInfo, BatchRun

from .common import StaticBatchBackend, package_version


class HFBackend(StaticBatchBackend):
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
        return BackendInfo(name, name, package_version("transformers"), total, per_step, row, self.threads, self.device,
                           {"folder": self.folder, "dtype": self.dtype, "torch": package_version("torch"),
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
