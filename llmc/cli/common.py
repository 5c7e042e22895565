"""What several commands share: JSON output, and models given as a GGUF file or a Hugging Face folder."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from llmc.compiler.quant_modes import QUANT_MODES

F = TypeVar("F", bound=Callable[..., Any])

MODEL_HELP = ("MODEL is an artifact, a GGUF file or a Hugging Face folder; the last two are compiled once on "
              "first use and cached (`llmc cache ls`).")


def emit_json(data: Any) -> None:
    """Print ``data`` as indented JSON."""
    click.echo(json.dumps(data, indent=1))


def compile_on_first_use(command: F) -> F:
    """Add ``--target`` and ``--quant``: how a MODEL that is not an artifact yet is compiled."""
    command = click.option(
        "--quant", type=click.Choice(list(QUANT_MODES)), default=None,
        help="When MODEL is a GGUF file or a folder: its weight quantization (default: native for a GGUF file, "
             "its quantized blocks as they are; none for a folder).")(command)
    return click.option(
        "--target", "compile_target", default="torch", show_default=True,
        help="When MODEL is a GGUF file or a folder: the target it is compiled for (see `llmc targets`).")(command)


def resolve_model(model: Path, target: str = "torch", quant: str | None = None, device: str | None = None) -> Path:
    """The artifact for MODEL: itself, or its cached build (compiled now if there is none yet)."""
    from llmc.artifact_cache import default_options, resolve_model, source_kind

    if source_kind(model) == "artifact":
        return model
    return resolve_model(model, default_options(model, target, quant, device))
