"""``llmc compile``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from llmc.compiler.errors import LlmcError
from llmc.compiler.options import parse_value
from llmc.compiler.quant_modes import QUANT_MODES

QUANT_HELP = "Weight quantization: " + "; ".join(f"{m.name}: {m.doc}" for m in QUANT_MODES.values()) + "."


@click.command(name="compile")
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Artifact directory.")
@click.option("--target", default="torch", show_default=True, help="Code generator (see `llmc targets`).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Weight dtype (default: as stored).")
@click.option("--device", default="cpu", show_default=True, help="Device the artifact is built for.")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True, help="Pipeline O0..O3.")
@click.option("--passes", default=None, help='Custom pipeline, e.g. "dce,fuse-qkv,fuse-gate-up".')
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None, help="Write the IR after every pass here.")
@click.option("--quant", type=click.Choice(list(QUANT_MODES)), default=None,
              help=QUANT_HELP + " Default: native for a GGUF source, none otherwise.")
@click.option("--group-size", type=click.IntRange(1), default=32, show_default=True,
              help="int4 group size (32, 64, 128).")
@click.option("--sym/--asym", "sym", default=None, help="Symmetric or asymmetric codes (default: int8 sym, int4 asym).")
@click.option("--calib-file", type=click.Path(path_type=Path), default=None,
              help="Calibration text (or JSON token ids) for activation-aware int4 scales.")
@click.option("--quant-override", "quant_override", multiple=True,
              help="PATTERN=SCHEME per param name, e.g. 'layers.0.*=int8' or 'lm_head=fp16' (repeatable).")
@click.option("--eval-file", type=click.Path(path_type=Path), default=None,
              help="Held-out text (or JSON ids) scored against the unquantized model; results go in the manifest.")
@click.option("--max-ppl-increase", default=None, help="Accuracy budget, e.g. 10%; fail (exit 2) when over it.")
@click.option("--auto-escalate", is_flag=True, help="Raise the precision of the most sensitive layers until it fits.")
@click.option("--arch", default=None,
              help="Device architecture: LLVM CPU name, CUDA tag/sm_XX (nvidia/nvidia-h100, sm_90a) or AMD gfx942.")
@click.option("--tune", type=click.IntRange(0), default=0, show_default=True,
              help="Meta-schedule tuning trials (tvm target, cpu: the batch-1 decode's matmul kernels; "
                   "the tuning log is cached and reused).")
@click.option("--target-option", "target_option", multiple=True,
              help="KEY=VALUE passed to the target, e.g. accuracy_level=4 (onnx: int8 activations) (repeatable).")
def compile_cmd(source: Path, out: Path, target: str, dtype: str | None, device: str, opt_level: int,
                passes: str | None, dump_ir: Path | None, quant: str | None, group_size: int, sym: bool | None,
                calib_file: Path | None, quant_override: tuple[str, ...], eval_file: Path | None,
                max_ppl_increase: str | None, auto_escalate: bool, arch: str | None, tune: int,
                target_option: tuple[str, ...]) -> None:
    """Compile SOURCE (a Hugging Face folder or a .gguf file) into an artifact."""
    from llmc.driver import CompileOptions, compile_model

    options = CompileOptions(target=target, dtype=dtype, opt_level=opt_level, passes=passes,
                             dump_ir=dump_ir, device=device, quant=quant, group_size=group_size, sym=sym,
                             calib_file=calib_file, quant_override=quant_override, eval_file=eval_file,
                             max_ppl_increase=max_ppl_increase, auto_escalate=auto_escalate)
    if arch is not None:
        options.target_options["arch"] = arch
    if tune:
        options.target_options["tune"] = tune
    options.target_options.update(parse_target_options(target_option))
    path = compile_model(source, out, options)
    manifest = _manifest(path)
    _echo_quality(manifest)
    _echo_target_warnings(manifest)
    _echo_capacity(path, device)
    click.echo(f"wrote {path}")


def _echo_capacity(path: Path, device: str) -> None:
    """How many sequences of 2048 tokens (or the context) fit: in the GPU's memory when the artifact is
    for a GPU that is visible here, else in 8 GiB."""
    from llmc.runtime.artifact import Artifact
    from llmc.runtime.capacity import artifact_capacity

    memory = 8 << 30
    if device.startswith("cuda"):
        try:
            import torch

            if torch.cuda.is_available():
                memory = int(torch.cuda.get_device_properties(0).total_memory)
        except ImportError:
            pass
    artifact = Artifact.load(path, verify=False)
    click.echo(artifact_capacity(artifact, memory).line(min(2048, artifact.config.max_position)))


def parse_target_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict (values as int, float or bool when they read as one)."""
    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise LlmcError(f"--target-option must be KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = parse_value(value)
    return options


def _manifest(path: Path) -> dict[str, Any]:
    from llmc.runtime.artifact import MANIFEST

    return dict(json.loads((path / MANIFEST).read_text()))


def _echo_target_warnings(manifest: dict[str, Any]) -> None:
    """Print the target's notes that start with ``warning:`` (e.g. no TensorRT engine was built)."""
    for note in manifest["target"].get("notes", []):
        if str(note).startswith("warning:"):
            click.echo(note)


def _echo_quality(manifest: dict[str, Any]) -> None:
    """Print the accuracy gate's result (and escalated layers) recorded in the manifest."""
    quality = manifest.get("quality")
    if not quality:
        return
    for step in (quality.get("escalation") or {}).get("steps", []):
        click.echo(f"escalated {step['unit']} to {'/'.join(step['to'])} (measured KL {step['sensitivity_kl']:.4g}): "
                   f"ppl +{step['ppl_increase']:.2%}")
    q, ref = quality["quantized"], quality["reference"]
    click.echo(f"quality: ppl {q['perplexity']:.4f} vs {ref['perplexity']:.4f} unquantized "
               f"(+{quality['ppl_increase']:.2%}), KL {q['kl_mean']:.4g}, top-1 {q['top1_agreement']:.1%} "
               f"on {q['tokens']} tokens")
