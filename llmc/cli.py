"""The ``llmc`` command line. Parsing and printing only: work happens in the packages."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import click

from llmc import __version__
from llmc.errors import LlmcError


class LlmcGroup(click.Group):
    """Turns :class:`LlmcError` into one line on stderr and exit status 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except LlmcError as exc:
            click.echo(f"error: {exc}", err=True)
            ctx.exit(exc.exit_code)


@click.group(cls=LlmcGroup)
@click.version_option(__version__, prog_name="llmc")
def main() -> None:
    """llmc: compile LLMs into optimized artifacts and serve them."""


def _emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=1))


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Artifact directory.")
@click.option("--target", default="torch", show_default=True, help="Code generator (see `llmc targets`).")
@click.option("--dtype", type=click.Choice(["float32", "float16", "bfloat16"]), default=None,
              help="Weight dtype (default: as stored).")
@click.option("--device", default="cpu", show_default=True, help="Device the artifact is built for.")
@click.option("--opt-level", type=click.IntRange(0, 3), default=2, show_default=True, help="Pipeline O0..O3.")
@click.option("--passes", default=None, help='Custom pipeline, e.g. "dce,fuse-qkv,fuse-gate-up".')
@click.option("--dump-ir", type=click.Path(path_type=Path), default=None, help="Write the IR after every pass here.")
@click.option("--quant", type=click.Choice(["none", "fp16", "bf16", "int8", "int4", "native"]), default="none",
              show_default=True, help="Weight quantization; native keeps a GGUF's Q8_0/Q4_0/Q4_1 blocks as stored.")
@click.option("--group-size", type=int, default=32, show_default=True, help="int4 group size (32, 64, 128).")
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
def compile(source: Path, out: Path, target: str, dtype: str | None, device: str, opt_level: int,
            passes: str | None, dump_ir: Path | None, quant: str, group_size: int, sym: bool | None,
            calib_file: Path | None, quant_override: tuple[str, ...], eval_file: Path | None,
            max_ppl_increase: str | None, auto_escalate: bool, arch: str | None, tune: int,
            target_option: tuple[str, ...]) -> None:
    """Compile SOURCE (a Hugging Face folder or a .gguf file) into an artifact."""
    from llmc.compiler.driver import CompileOptions, compile_model

    options = CompileOptions(target=target, dtype=dtype, opt_level=opt_level, passes=passes,
                             dump_ir=dump_ir, device=device, quant=quant, group_size=group_size, sym=sym,
                             calib_file=calib_file, quant_override=quant_override, eval_file=eval_file,
                             max_ppl_increase=max_ppl_increase, auto_escalate=auto_escalate)
    if arch is not None:
        options.target_options["arch"] = arch
    if tune:
        options.target_options["tune"] = tune
    options.target_options.update(_parse_target_options(target_option))
    path = compile_model(source, out, options)
    _echo_quality(path)
    _echo_target_warnings(path)
    click.echo(f"wrote {path}")


def _parse_target_options(items: tuple[str, ...]) -> dict[str, Any]:
    """``KEY=VALUE`` strings to a dict (values as int, float or bool when they read as one)."""
    from llmc.passes.pipelines import _parse_value

    options: dict[str, Any] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise LlmcError(f"--target-option must be KEY=VALUE, got {item!r}")
        options[key.strip().replace("-", "_")] = _parse_value(value)
    return options


def _echo_target_warnings(path: Path) -> None:
    """Print the target's notes that start with ``warning:`` (e.g. no TensorRT engine was built)."""
    from llmc.runtime.artifact import MANIFEST

    for note in json.loads((path / MANIFEST).read_text())["target"].get("notes", []):
        if str(note).startswith("warning:"):
            click.echo(note)


def _echo_quality(path: Path) -> None:
    """Print the accuracy gate's result (and escalated layers) recorded in the manifest."""
    from llmc.runtime.artifact import MANIFEST

    quality = json.loads((path / MANIFEST).read_text()).get("quality")
    if not quality:
        return
    for step in (quality.get("escalation") or {}).get("steps", []):
        click.echo(f"escalated {step['unit']} to {'/'.join(step['to'])} (measured KL {step['sensitivity_kl']:.4g}): "
                   f"ppl +{step['ppl_increase']:.2%}")
    q, ref = quality["quantized"], quality["reference"]
    click.echo(f"quality: ppl {q['perplexity']:.4f} vs {ref['perplexity']:.4f} unquantized "
               f"(+{quality['ppl_increase']:.2%}), KL {q['kl_mean']:.4g}, top-1 {q['top1_agreement']:.1%} "
               f"on {q['tokens']} tokens")


def _parse_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise LlmcError(f"--prompt-ids must be integers separated by spaces: {text!r}") from exc


def _read_prompts_file(path: Path) -> list[str | list[int]]:
    """One prompt per line, or JSONL objects with "prompt" (text or a list of token ids)."""
    try:
        lines = [line for line in path.read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise LlmcError(f"{path}: {exc}") from exc
    prompts: list[str | list[int]] = []
    for number, line in enumerate(lines, 1):
        if line.lstrip().startswith("{"):
            try:
                prompt = json.loads(line)["prompt"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise LlmcError(f"{path}:{number}: expected a JSON object with a \"prompt\" key") from exc
            is_ids = isinstance(prompt, list) and all(isinstance(t, int) for t in prompt)
            if not isinstance(prompt, str) and not is_ids:
                raise LlmcError(f"{path}:{number}: \"prompt\" must be a string or a list of token ids")
            prompts.append(prompt)
        else:
            prompts.append(line)
    if not prompts:
        raise LlmcError(f"{path} has no prompts")
    return prompts


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", default=None, help="Prompt text.")
@click.option("--prompt-ids", default=None, help='Prompt token ids, e.g. "1 2 3".')
@click.option("--prompts-file", type=click.Path(path_type=Path), default=None,
              help="Many prompts, run concurrently: one per line, or JSONL with \"prompt\".")
@click.option("--max-tokens", default=64, show_default=True, type=int)
@click.option("--temperature", default=1.0, show_default=True, type=float)
@click.option("--top-k", default=0, type=int)
@click.option("--top-p", default=1.0, type=float)
@click.option("--seed", default=None, type=int)
@click.option("--stop", multiple=True, help="Stop string (repeatable).")
@click.option("--ignore-eos", is_flag=True, help="Keep generating after EOS.")
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--threads", default=None, type=int, help="CPU threads for the executor.")
@click.option("--max-running", default=32, show_default=True, type=int, help="Sequences decoded together.")
@click.option("--deterministic", is_flag=True, help="Batch-invariant kernels: results independent of batching.")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON object (one line per prompt with --prompts-file).")
def run(artifact: Path, prompt: str | None, prompt_ids: str | None, prompts_file: Path | None, max_tokens: int,
        temperature: float, top_k: int, top_p: float, seed: int | None, stop: tuple[str, ...], ignore_eos: bool,
        device: str | None, threads: int | None, max_running: int, deterministic: bool, as_json: bool) -> None:
    """Generate text from a compiled ARTIFACT."""
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    if sum(x is not None for x in (prompt, prompt_ids, prompts_file)) != 1:
        raise LlmcError("give exactly one of --prompt, --prompt-ids or --prompts-file")
    prompts: list[str | list[int]]
    if prompts_file is not None:
        prompts = _read_prompts_file(prompts_file)
    elif prompt is not None:
        prompts = [prompt]
    else:
        prompts = [_parse_ids(prompt_ids or "")]
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                            stop=list(stop), ignore_eos=ignore_eos)
    with Engine.load(str(artifact), device=device, threads=threads, max_running=max_running,
                     max_num_tokens=max(512, max_running), deterministic=deterministic) as engine:
        if engine.tokenizer is None and any(isinstance(p, str) for p in prompts):
            raise LlmcError(f"{artifact} has no tokenizer; use --prompt-ids (or token id lists in --prompts-file)")
        outputs = engine.generate(prompts, params)
    for out in outputs:
        record = {"text": out.text, "token_ids": out.token_ids, "prompt_token_ids": out.prompt_token_ids,
                  "finish_reason": out.finish_reason, "timings": out.timings}
        if as_json and prompts_file is not None:
            click.echo(json.dumps(record))
        elif as_json:
            _emit_json(record)
        else:
            click.echo(out.text if out.text is not None else " ".join(map(str, out.token_ids)))


def _read_eval_ids(model: Any, text_file: Path | None, ids_file: Path | None) -> list[int]:
    if (text_file is None) == (ids_file is None):
        raise LlmcError("give exactly one of --text-file or --ids-file")
    if ids_file is not None:
        try:
            ids = json.loads(ids_file.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LlmcError(f"{ids_file}: cannot read a JSON list of ids: {exc}") from exc
        if not isinstance(ids, list) or not all(isinstance(i, int) for i in ids):
            raise LlmcError(f"{ids_file}: expected a JSON list of integers")
        return ids
    assert text_file is not None
    if model.tokenizer is None:
        raise LlmcError("this artifact has no tokenizer; use --ids-file")
    try:
        text = text_file.read_text()
    except OSError as exc:
        raise LlmcError(f"{text_file}: {exc}") from exc
    return list(model.tokenizer.encode(text))


@main.command(name="eval")
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--text-file", type=click.Path(path_type=Path), default=None)
@click.option("--ids-file", type=click.Path(path_type=Path), default=None)
@click.option("--reference", type=click.Path(path_type=Path), default=None,
              help="Reference artifact: adds KL divergence and top-1 agreement.")
@click.option("--window", type=int, default=None, help="Scoring window (default: the model context).")
@click.option("--json", "as_json", is_flag=True)
def eval_cmd(artifact: Path, text_file: Path | None, ids_file: Path | None, reference: Path | None,
             window: int | None, as_json: bool) -> None:
    """Perplexity of ARTIFACT on a text (and divergence from a reference artifact)."""
    from llmc.runtime.evaluate import evaluate
    from llmc.runtime.generate import load_model

    model = load_model(str(artifact))
    ids = _read_eval_ids(model, text_file, ids_file)
    ref = load_model(str(reference)).executor if reference is not None else None
    result = evaluate(model.executor, ids, reference=ref, window=window).to_dict()
    if as_json:
        _emit_json(result)
    else:
        for key, value in result.items():
            if value is not None:
                click.echo(f"{key:>16}: {value}")


@main.command()
@click.argument("source", type=click.Path(path_type=Path))
@click.option("--text", required=True)
@click.option("--no-special", is_flag=True, help="Do not add BOS/special tokens.")
@click.option("--json", "as_json", is_flag=True)
def tokenize(source: Path, text: str, no_special: bool, as_json: bool) -> None:
    """Tokenize TEXT with the tokenizer of SOURCE (a model file/folder or an artifact)."""
    from llmc.runtime.artifact import MANIFEST, Artifact

    if (source / MANIFEST).exists():
        tokenizer = Artifact.load(source, verify=False).tokenizer()
    else:
        from llmc.compiler.frontends.source import load_source

        tokenizer = load_source(source).tokenizer
    if tokenizer is None:
        raise LlmcError(f"{source} has no tokenizer")
    ids = tokenizer.encode(text, add_special_tokens=not no_special)
    if as_json:
        _emit_json({"ids": ids, "tokens": [tokenizer.id_to_token(i) for i in ids]})
    else:
        click.echo(" ".join(map(str, ids)))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--ir/--no-ir", "show_ir", default=False, help="Print the full IR text.")
@click.option("--json", "as_json", is_flag=True)
def inspect(artifact: Path, show_ir: bool, as_json: bool) -> None:
    """Summarize an ARTIFACT: manifest, op counts, params (and the IR with --ir)."""
    from llmc.runtime.inspect import summarize

    summary, ir_text = summarize(artifact)
    if as_json:
        _emit_json(summary)
    else:
        click.echo(summary["text"])
    if show_ir:
        click.echo(ir_text)


@main.command()
@click.option("--target", default=None, help="Also show what each level runs for this target.")
@click.option("--json", "as_json", is_flag=True)
def passes(target: str | None, as_json: bool) -> None:
    """List every pass (name, doc) and every pipeline with its passes."""
    from llmc.passes.listing import describe_passes, format_passes
    from llmc.targets.registry import get_target

    data = describe_passes(get_target(target) if target else None)
    if as_json:
        _emit_json(data)
    else:
        click.echo(format_passes(data))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(0, 65535))
@click.option("--api-key", envvar="LLMC_API_KEY", default=None,
              help="Require 'Authorization: Bearer KEY' on /v1/* (also read from $LLMC_API_KEY).")
@click.option("--served-model-name", default=None, help="Model id clients send (default: the artifact's folder name).")
@click.option("--max-running", default=32, show_default=True, type=click.IntRange(1), help="Sequences per step.")
@click.option("--max-queue", default=256, show_default=True, type=click.IntRange(1),
              help="Sequences held (running + waiting) before requests get 429.")
@click.option("--max-num-tokens", default=512, show_default=True, type=click.IntRange(1), help="Token budget per step.")
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["critical", "error", "warning", "info", "debug"]))
def serve(artifact: Path, host: str, port: int, api_key: str | None, served_model_name: str | None, max_running: int,
          max_queue: int, max_num_tokens: int, device: str | None, log_level: str) -> None:
    """Serve ARTIFACT over an OpenAI-compatible HTTP API (/v1/completions, /v1/chat/completions, /metrics)."""
    from llmc.runtime.server.serve import serve as run_server

    run_server(artifact, host=host, port=port, api_key=api_key, served_model_name=served_model_name,
               log_level=log_level, max_running=max_running, max_queue=max_queue, max_num_tokens=max_num_tokens,
               device=device)



@main.command()
@click.option("--preset", required=True, help="llama-3.2-1b, llama-3.2-3b, smollm2-135m or tiny.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path),
              help="Folder (safetensors) or .gguf file / folder for it (gguf).")
@click.option("--format", "fmt", type=click.Choice(["safetensors", "gguf"]), default="safetensors", show_default=True)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--dtype", type=click.Choice(["float16", "bfloat16", "float32"]), default="float16", show_default=True,
              help="Storage dtype of the weight matrices (norms stay float32).")
def synth(preset: str, out: Path, fmt: str, seed: int, dtype: str) -> None:
    """Write a model with seeded random weights and a real model's exact shapes."""
    from llmc.synth import get_preset, param_count, synthesize

    p = get_preset(preset)
    path = synthesize(preset, out, fmt=fmt, seed=seed, dtype=dtype)
    click.echo(f"wrote {path} ({p.name}, {param_count(p) / 1e6:.1f}M params, {dtype}, seed {seed})")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--scenario", default="single", show_default=True,
              help="single, batch, concurrency, or a comma-separated list of them.")
@click.option("--batch-sizes", default="1,2,4,8,16,32,64", show_default=True)
@click.option("--concurrency", default="1,5,10,25,50,100", show_default=True)
@click.option("--prompt-len", default=128, show_default=True, type=int)
@click.option("--gen-len", default=128, show_default=True, type=int)
@click.option("--warmup", default=1, show_default=True, type=int)
@click.option("--repeat", default=3, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random prompts.")
@click.option("--threads", default=None, type=int, help="CPU threads (default: all cores).")
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report here.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="Write a PNG plot here.")
@click.option("--bandwidth-mib", default=256, show_default=True, type=click.IntRange(1),
              help="Size of the array copied to measure memory bandwidth.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def bench(artifact: Path, scenario: str, batch_sizes: str, concurrency: str, prompt_len: int, gen_len: int,
          warmup: int, repeat: int, seed: int, threads: int | None, device: str | None, json_out: Path | None,
          plot_out: Path | None, bandwidth_mib: int, quiet: bool) -> None:
    """Benchmark ARTIFACT: throughput, TTFT, TPOT, latency, memory and % of the bandwidth roofline."""
    import os

    from llmc.runtime.bench import BenchSettings, markdown_table, parse_sizes, run_bench, write_outputs

    settings = BenchSettings(
        scenarios=tuple(s.strip() for s in scenario.split(",") if s.strip()),
        batch_sizes=parse_sizes(batch_sizes, "--batch-sizes"), concurrency=parse_sizes(concurrency, "--concurrency"),
        prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, repeat=repeat, seed=seed,
        threads=threads or os.cpu_count())
    report = run_bench(artifact, settings, device=device, quiet=quiet, bandwidth_mib=bandwidth_mib)
    write_outputs(report, json_out, plot_out)
    bw = report["bandwidth"]
    click.echo(f"{report['machine']['cpu_model']}, {report['machine']['logical_cores']} cores, "
               f"load {report['machine']['load_average']}, copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s")
    click.echo(markdown_table(report["results"]))

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
