"""``llmc bench``."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--scenario", default="single", show_default=True,
              help="single, batch, concurrency, or a comma-separated list of them.")
@click.option("--batch-sizes", default="1,2,4,8,16,32,64", show_default=True)
@click.option("--concurrency", default="1,5,10,25,50,100", show_default=True)
@click.option("--prompt-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--gen-len", default=128, show_default=True, type=click.IntRange(1))
@click.option("--warmup", default=1, show_default=True, type=click.IntRange(0))
@click.option("--repeat", default=3, show_default=True, type=click.IntRange(1))
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the random prompts.")
@click.option("--threads", default=None, type=click.IntRange(1), help="CPU threads (default: all cores).")
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

