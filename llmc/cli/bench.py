"""``llmc bench``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from llmc.cli.common import MODEL_HELP, compile_on_first_use, resolve_model


def machine_line(report: dict[str, Any]) -> str:
    """``CPU, N cores, load 1.52 1.20 0.98, copy bandwidth 40.1 GB/s``."""
    machine, bw = report["machine"], report["bandwidth"]
    load = machine.get("load_average")
    parts = [str(machine.get("cpu_model") or "unknown CPU"), f"{machine.get('logical_cores')} cores"]
    if load:
        parts.append("load " + " ".join(f"{x:.2f}" for x in load))
    if bw:
        parts.append(f"copy bandwidth {bw['bytes_per_s'] / 1e9:.1f} GB/s")
    return ", ".join(parts)


@click.command()
@click.argument("artifact", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--scenario", default="single", show_default=True,
              help="single, batch, concurrency, or a comma-separated list of them.")
@click.option("--batch-sizes", default="1,2,4,8,16,32,64", show_default=True,
              help="Batch sizes of the batch scenario (static batches decoded in lock-step).")
@click.option("--concurrency", default="1,5,10,25,50,100", show_default=True,
              help="Numbers of requests submitted at once in the concurrency scenario.")
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(1),
              help="Prompt tokens per sequence.")
@click.option("--gen-len", default=128, show_default=True, type=click.IntRange(1),
              help="Generated tokens per sequence.")
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0), help="Untimed runs before each point.")
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1), help="Timed runs per point.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the random prompts.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores).")
@click.option("--device", default=None, help="Override the artifact's device.")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None, help="Write the report here.")
@click.option("--plot", "plot_out", type=click.Path(path_type=Path), default=None, help="Write a PNG plot here.")
@click.option("--bandwidth-mib", default=256, show_default=True, type=click.IntRange(1),
              help="Size of the array copied to measure memory bandwidth.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
@compile_on_first_use
def bench(artifact: Path, scenario: str, batch_sizes: str, concurrency: str, prompt_len: int, gen_len: int,
          warmup: int, repeat: int, seed: int, threads: int | None, device: str | None, json_out: Path | None,
          plot_out: Path | None, bandwidth_mib: int, quiet: bool, compile_target: str, quant: str | None) -> None:
    """Benchmark MODEL: throughput, TTFT, TPOT, latency, memory and % of the bandwidth roofline.

    Needs the bench extra (jsonschema, tqdm, matplotlib for --plot); checked before anything runs.
    MODEL_HELP
    """
    import os

    from llmc.runtime.bench import (
        BenchSettings,
        check_dependencies,
        markdown_table,
        parse_sizes,
        run_bench,
        write_outputs,
    )

    check_dependencies(plot=plot_out is not None, quiet=quiet)
    settings = BenchSettings(
        scenarios=tuple(s.strip() for s in scenario.split(",") if s.strip()),
        batch_sizes=parse_sizes(batch_sizes, "--batch-sizes"), concurrency=parse_sizes(concurrency, "--concurrency"),
        prompt_len=prompt_len, gen_len=gen_len, warmup=warmup, repeat=repeat, seed=seed,
        threads=threads or os.cpu_count())
    path = resolve_model(artifact, compile_target, quant, device)
    name = artifact.resolve().name if path == artifact else artifact.name.removesuffix(".gguf")
    report = run_bench(path, settings, device=device, quiet=quiet, bandwidth_mib=bandwidth_mib, name=name)
    write_outputs(report, json_out, plot_out)
    click.echo(machine_line(report))
    click.echo(markdown_table(report["results"]))


bench.help = (bench.help or "").replace("MODEL_HELP", MODEL_HELP)
