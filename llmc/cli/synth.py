"""``llmc synth``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.option("--preset", required=True, help="llama-3.2-1b, llama-3.2-3b, smollm2-135m or tiny.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Folder (safetensors) or .gguf file / folder for it (gguf).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]), default="safetensors", show_default=True,
              help="A Hugging Face folder (safetensors) or a GGUF file.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the random weights.")
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of the weight matrices (norms stay float32).")
def synth(preset: str, out: Path, fmt: str, seed: int, dtype: str) -> None:
    """Write a model with seeded random weights and a real model's exact shapes."""
    from llmc.synth import get_preset, param_count, synthesize

    p = get_preset(preset)
    path = synthesize(preset, out, fmt=fmt, seed=seed, dtype=dtype)
    click.echo(f"wrote {path} ({p.name}, {param_count(p) / 1e6:.1f}M params, {dtype}, seed {seed})")

