"""`llmc bench`: the report follows its schema, the numbers add up, the plot is written."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.errors import InputError, LlmcError
from llmc.runtime.bench import BenchSettings, LlmcBackend, make_prompts, parse_sizes, run_bench, validate
from llmc.runtime.bench.backends import BackendInfo, weight_bytes_per_step
from llmc.runtime.bench.harness import roofline

pytest.importorskip("jsonschema", reason="bench report validation needs jsonschema (the `bench` extra)")

SETTINGS = {"prompt_len": 5, "gen_len": 4, "warmup": 0, "repeat": 2, "threads": 1}


@pytest.fixture(scope="module")
def tiny_artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmc.driver import CompileOptions, compile_model
    from llmc.synth import synthesize

    root = tmp_path_factory.mktemp("bench")
    return compile_model(synthesize("tiny", root / "tiny", seed=0), root / "art", CompileOptions())


@pytest.fixture(scope="module")
def report(tiny_artifact: Path) -> dict[str, Any]:
    settings = BenchSettings(scenarios=("single", "batch", "concurrency"), batch_sizes=(1, 3), concurrency=(1, 3),
                             **SETTINGS)
    return run_bench(tiny_artifact, settings, quiet=True, bandwidth_mib=16)


def test_report_follows_the_schema_and_counts_add_up(report: dict[str, Any]) -> None:
    validate(report)
    json.loads(json.dumps(report))  # plain JSON
    rows = {(r["scenario"], r["size"]): r for r in report["results"]}
    assert list(rows) == [("single", 1), ("batch", 1), ("batch", 3), ("concurrency", 1), ("concurrency", 3)]
    for (_scenario, size), row in rows.items():
        assert row["error"] is None, row["error"]
        assert row["output_tokens"] == size * 4 * 2  # gen_len x repeats per sequence
        assert row["decode_tok_s"] > 0 and row["prefill_tok_s"] > 0 and row["aggregate_tok_s"] > 0
        assert row["ttft_s"]["p50"] <= row["e2e_s"]["p50"]
        assert row["roofline"]["pct"] > 0 and row["roofline"]["limit_tok_s"] > 0
        assert row["peak_rss_bytes"] > 0
    assert rows[("batch", 3)]["tpot_s"]["n"] == 2 * 3  # (gen_len - 1) steps per run
    assert rows[("concurrency", 3)]["ttft_s"]["n"] == 3 * 2  # one per request
    backend = report["backends"][0]
    assert backend["engine"] == "llmc" and backend["label"] == "llmc/torch:art" and backend["threads"] == 1
    assert report["bandwidth"]["bytes_per_s"] > 1e8
    assert report["machine"]["logical_cores"] >= 1 and report["software"]["llmc"]


def test_schema_rejects_broken_reports(report: dict[str, Any]) -> None:
    bad = copy.deepcopy(report)
    del bad["results"][0]["decode_tok_s"]
    with pytest.raises(LlmcError, match="results/0"):
        validate(bad)
    bad = copy.deepcopy(report)
    bad["results"][1]["scenario"] = "burst"
    with pytest.raises(LlmcError, match="schema"):
        validate(bad)
    bad = copy.deepcopy(report)
    bad["results"][0]["ttft_s"]["p99"] = 1.0
    with pytest.raises(LlmcError):
        validate(bad)


def test_plot_and_json_are_written(report: dict[str, Any], tmp_path: Path) -> None:
    from llmc.runtime.bench import write_outputs

    write_outputs(report, tmp_path / "r.json", tmp_path / "r.png")
    assert json.loads((tmp_path / "r.json").read_text())["schema"] == "llmc-bench"
    png = (tmp_path / "r.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_batched_greedy_tokens_match_single_sequence_runs(tiny_artifact: Path) -> None:
    backend = LlmcBackend(tiny_artifact, threads=1)
    prompts = make_prompts(3, 6, backend.artifact.config.vocab_size, seed=4, run=0)
    batched = backend.run_batch(prompts, 5).token_ids
    alone = [backend.run_batch([p], 5).token_ids[0] for p in prompts]
    assert batched == alone
    engine = backend.run_concurrent(prompts, 5)
    assert [r.token_ids for r in engine] == alone
    backend.close()


def test_weight_bytes_per_step_counts_the_embedding_once() -> None:
    params = {
        "embed": {"shape": [100, 8], "bytes": 3200},
        "lm_head": {"shape": [100, 8], "bytes": 3200},
        "layers.0.q": {"shape": [8, 8], "bytes": 256},
        "final_norm": {"shape": [8], "bytes": 32},
    }
    total, per_step, row = weight_bytes_per_step(params)
    assert (total, row) == (6688, 32) and per_step == 3200 + 256 + 32 + 32
    assert weight_bytes_per_step({"layers.0.q": {"shape": [8, 8], "bytes": 256}}) == (256, 256, 0)
    info = BackendInfo("x", "x", None, total, per_step, row)
    r = roofline(info, 4, decode_tok_s=100.0, bandwidth=1e6)
    assert r["weight_bytes_per_step"] == per_step + 3 * 32
    assert r["limit_tok_s"] == pytest.approx(4 * 1e6 / (per_step + 96))
    assert r["pct"] == pytest.approx(100 * 100.0 / r["limit_tok_s"])


def test_prompts_are_seeded_and_avoid_special_tokens() -> None:
    a = make_prompts(4, 16, 512, seed=1, run=0)
    assert a == make_prompts(4, 16, 512, seed=1, run=0) != make_prompts(4, 16, 512, seed=1, run=1)
    ids = np.asarray(a)
    assert ids.shape == (4, 16) and ids.min() >= 64 and ids.max() < 256


def test_bad_settings_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="unknown scenario"):
        BenchSettings(scenarios=("burst",))
    with pytest.raises(InputError, match="--batch-sizes"):
        parse_sizes("1,x", "--batch-sizes")
    with pytest.raises(InputError, match="--repeat"):
        BenchSettings(repeat=0)
    result = CliRunner().invoke(main, ["bench", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "error:" in result.output


def test_cli_prints_a_table_and_writes_files(tiny_artifact: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(main, [
        "bench", str(tiny_artifact), "--scenario", "batch", "--batch-sizes", "1,2", "--prompt-len", "4",
        "--gen-len", "3", "--warmup", "0", "--repeat", "1", "--threads", "1", "--quiet", "--bandwidth-mib", "8",
        "--json", str(tmp_path / "b.json"), "--plot", str(tmp_path / "b.png"),
    ])
    assert result.exit_code == 0, result.output
    assert "| llmc/torch:art | batch | 2 |" in result.output and "GB/s" in result.output
    validate(json.loads((tmp_path / "b.json").read_text()))
    assert (tmp_path / "b.png").stat().st_size > 0


def test_plot_series_per_axis_and_engine(report: dict[str, Any], tmp_path: Path) -> None:
    from llmc.runtime.bench import write_outputs
    from llmc.runtime.bench.plot import plot_series

    series = plot_series(report)
    assert sorted(series) == ["batch", "concurrency"]
    assert [p["size"] for p in series["batch"]["llmc/torch:art"]] == [1, 3]  # the batch sweep's own size 1
    assert [p["scenario"] for p in series["batch"]["llmc/torch:art"]] == ["batch", "batch"]
    single_only = copy.deepcopy(report)
    single_only["results"] = [r for r in report["results"] if r["scenario"] == "single"]
    assert [p["scenario"] for p in plot_series(single_only)["batch"]["llmc/torch:art"]] == ["single"]
    write_outputs(single_only, None, tmp_path / "single.png")  # one point per engine still plots
    assert (tmp_path / "single.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_prints_rounded_machine_load(tiny_artifact: Path) -> None:
    from llmc.cli.bench import machine_line

    line = machine_line({"machine": {"cpu_model": "CPU X", "logical_cores": 2, "load_average": [1.23456, 0.5, 0.0]},
                         "bandwidth": {"bytes_per_s": 41.26e9}})
    assert line == "CPU X, 2 cores, load 1.23 0.50 0.00, copy bandwidth 41.3 GB/s"
