"""A tiny asyncio service embedding the llmc engine (no web framework needed).

    python examples/service.py ARTIFACT --demo "Once upon a time" "The cat"   # concurrent streams to stdout
    python examples/service.py ARTIFACT --port 8765                           # line protocol over TCP
    #   then: printf 'Once upon a time\\n' | nc 127.0.0.1 8765

The TCP service reads one prompt per line and streams the completion back, ending with an
empty line; a client that disconnects cancels its request (the engine frees its KV blocks).
Every connection is an ``async for`` over ``engine.stream``: one engine thread batches them all.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys

from llmc.runtime.engine import Engine
from llmc.runtime.sampling import SamplingParams


def _prompt(engine: Engine, text: str) -> str | list[int]:
    if engine.tokenizer is not None:
        return text
    return [int(t) for t in text.split()]  # models without a tokenizer take token ids


async def demo(engine: Engine, prompts: list[str], params: SamplingParams) -> None:
    """Stream several prompts at once; each line of output is tagged with its request."""

    async def one(i: int, text: str) -> None:
        async for chunk in engine.stream(_prompt(engine, text), params):
            if chunk.text or chunk.token_ids:
                shown = chunk.text if engine.tokenizer is not None else " ".join(map(str, chunk.token_ids))
                print(f"[{i}] {shown!r}", flush=True)
            if chunk.finish_reason:
                print(f"[{i}] done: {chunk.finish_reason}, ttft {chunk.output.timings['ttft_s']:.3f}s", flush=True)

    await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
    print(json.dumps(engine.stats(), indent=1))


async def serve(engine: Engine, params: SamplingParams, host: str, port: int) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := (await reader.readline()).decode().strip():
                async for chunk in engine.stream(_prompt(engine, line), params):
                    piece = chunk.text if engine.tokenizer is not None else "".join(f"{t} " for t in chunk.token_ids)
                    writer.write(piece.encode())
                    await writer.drain()  # raises when the client went away: the stream is cancelled
                writer.write(b"\n\n")
                await writer.drain()
        except Exception as exc:  # a disconnected or failing client's failure must not stop the service
            print(f"client error: {exc}", file=sys.stderr)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, host, port)
    print(f"listening on {host}:{port}", flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("artifact")
    parser.add_argument("--demo", nargs="+", metavar="PROMPT", help="stream these prompts concurrently and exit")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--temperature", type=float, default=0.8)
    args = parser.parse_args()
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=0)
    with Engine.load(args.artifact, max_running=32) as engine:
        if args.demo:
            asyncio.run(demo(engine, args.demo, params))
        else:
            with contextlib.suppress(KeyboardInterrupt):
                asyncio.run(serve(engine, params, args.host, args.port))


if __name__ == "__main__":
    main()
