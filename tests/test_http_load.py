"""benchmarks/http_load.py drives a real ``llmc serve`` with the official openai client and reports
in the bench schema: every request makes exactly gen_len tokens, failures are reported, not hidden."""

from __future__ import annotations

import json
from pathlib import Path
from types import ModuleType

import pytest

pytest.importorskip("openai", reason="the load script uses the official openai client (the `dev` extra)")
pytest.importorskip("jsonschema", reason="bench report validation needs jsonschema (the `bench` extra)")
pytest.importorskip("fastapi", reason="llmc serve needs the `serve` extra")

from tests.helpers import load_script
from tests.runtime.serving import MODEL, VOCAB, ServerProcess, build_chat_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "http_load.py"


def _script() -> ModuleType:
    return load_script(SCRIPT, "llmc_http_load")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("http-load")
    _, artifact = build_chat_model(root)
    with ServerProcess(artifact, "--served-model-name", MODEL, "--max-running", "4", log=root / "serve.log") as s:
        yield s


def test_concurrency_sweep_report(server, tmp_path: Path) -> None:
    out = tmp_path / "http.json"
    code = _script().main(["--base-url", f"{server.url}/v1", "--model", MODEL, "--vocab-size", str(VOCAB),
                           "--concurrency", "1,3", "--prompt-len", "9", "--gen-len", "5", "--warmup", "0",
                           "--repeat", "2", "--json", str(out), "--quiet"])
    assert code == 0
    report = json.loads(out.read_text())
    rows = {r["size"]: r for r in report["results"]}
    assert set(rows) == {1, 3}
    for size, row in rows.items():
        assert row["error"] is None and row["scenario"] == "concurrency"
        assert row["output_tokens"] == 2 * size * 5  # ignore_eos: exactly gen_len tokens per request
        assert row["ttft_s"]["n"] == 2 * size and 0 < row["ttft_s"]["p50"] <= row["e2e_s"]["p50"]
        assert row["aggregate_tok_s"] > 0
    # llmc serve's /metrics give the engine's decode steps under each load: 2 runs x 4 decode steps at
    # concurrency 1 (5 tokens: the first comes from the prompt's step), a note for concurrency 3 too
    notes = [n for n in report["notes"] if "the engine's decode steps took" in n]
    assert len(notes) == 2 and "concurrency 1:" in notes[0] and "(8 steps" in notes[0]
    assert "concurrency 3:" in notes[1]
    # the client's own CPU per streamed chunk (2 runs x 1 x 5 chunks at concurrency 1, 2 x 3 x 5 at 3)
    cpu = [n for n in report["notes"] if "the load client used" in n]
    assert len(cpu) == 2 and "concurrency 1:" in cpu[0] and "concurrency 3:" in cpu[1]
    per_chunk = [float(n.split("used ")[1].split(" ms")[0]) for n in cpu]
    assert all(0 < ms < 1000 for ms in per_chunk)


def test_failed_requests_fail_the_point(server, tmp_path: Path) -> None:
    out = tmp_path / "bad.json"
    code = _script().main(["--base-url", f"{server.url}/v1", "--model", "no-such-model", "--vocab-size",
                           str(VOCAB), "--concurrency", "2", "--prompt-len", "4", "--gen-len", "2", "--warmup", "0",
                           "--repeat", "1", "--json", str(out), "--quiet"])
    assert code == 1
    (row,) = json.loads(out.read_text())["results"]
    assert "2 of 2 requests failed" in row["error"] and "404" in row["error"]
