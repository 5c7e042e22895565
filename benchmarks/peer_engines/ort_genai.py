"""ONNX Runtime GenAI: the model built from a Hugging Face folder by its builder, then
``og.Generator`` with ``batch_size`` = the batch size."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from llmc.errors import UnsupportedError
from llmc.runtime.bench import BackendInfo, BatchRun

from .common import StaticBatchBackend, package_version


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


class OrtGenaiBackend(StaticBatchBackend):
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
        return BackendInfo("ort-genai", f"ort-genai/{self.precision}", package_version("onnxruntime-genai"), total,
                           total - embed + row, row, self.threads, "cpu",
                           {"folder": str(self.folder), "precision": self.precision,
                            "onnxruntime": package_version("onnxruntime")})

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
