"""benchmarks/kernel_paths.py times each CPU kernel path on a GGUF's tensors, grouped by type and shape."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from gguf import GGMLQuantizationType as Q

from llmc.targets.torch import qkernels
from tests.compiler.gguf_util import hf_to_gguf
from tests.helpers import load_script
from tests.models import write_random_hf_model

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_paths.py"


def test_every_quantized_shape_is_timed_on_every_path(tmp_path: Path) -> None:
    if qkernels.disabled() or not qkernels.available():
        pytest.skip("llmc CPU kernels could not be built here (no C++ compiler/ninja) or are disabled")
    hf = write_random_hf_model(tmp_path / "hf", seed=2, hidden_size=256, intermediate_size=512,
                               num_attention_heads=4, num_key_value_heads=2)
    gguf = hf_to_gguf(hf, tmp_path / "m.gguf", qtypes={"attn_q": Q.Q4_K, "attn_k": Q.Q8_0, "ffn_down": Q.Q6_K})
    out = tmp_path / "paths.json"
    script = load_script(SCRIPT, "llmc_kernel_paths")
    assert script.main([str(gguf), "--rows", "1,17", "--iters", "2", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["paths"] == qkernels.isa_paths()
    layers = json.loads((hf / "config.json").read_text())["num_hidden_layers"]
    seen = {(r["type"], r["out"], r["in"]): r["tensors"] for r in report["results"]}
    assert seen == {("Q4_K", 256, 256): layers, ("Q8_0", 128, 256): layers, ("Q6_K", 256, 512): layers}
    assert {r["rows"] for r in report["results"]} == {1, 17}
    for r in report["results"]:
        assert set(r["ms"]) == set(report["paths"]) and all(v > 0 for v in r["ms"].values())
    with pytest.raises(SystemExit, match="not available"):
        script.main([str(gguf), "--paths", "sse9"])
