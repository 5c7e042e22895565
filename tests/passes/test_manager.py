"""Pass manager, pipelines and the ``llmc passes`` command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import ClassVar

import pytest
from click.testing import CliRunner

from llmc.cli import main
from llmc.compiler.ir.graph import Function, Module, Node
from llmc.compiler.ir.ops import FUSED_OPS
from llmc.driver import CompileOptions, optimize
from llmc.errors import LlmcError, PassError
from llmc.passes.base import Pass, PassContext, PassResult
from llmc.passes.manager import PassManager
from llmc.passes.pipelines import PASSES, PIPELINES, parse_pipeline, pipeline_for
from llmc.targets.torch.target import TorchTarget
from tests.passes.util import llama_config, random_llama, run_pipeline


class _Breaker(Pass):
    """Appends a node that reads a value of another function (malformed)."""

    name: ClassVar[str] = "breaker"
    doc: ClassVar[str] = "breaks the IR on purpose"

    def run(self, module: Module, ctx: PassContext) -> PassResult:
        fn = module.functions["decode"]
        stray = Node("silu", (Node("input", (), {"name": "z"}, fn.nodes[0].out_types).out(),), {},
                     fn.nodes[0].out_types)
        broken = Function(fn.name, [*fn.nodes, stray], fn.outputs)
        return PassResult(Module({**module.functions, "decode": broken}, module.params, module.config), True)


def test_verifier_error_names_the_pass_and_the_passes_before(tmp_path: Path) -> None:
    module, weights = random_llama(llama_config(layers=1))
    passes = [*parse_pipeline("dce,cse"), _Breaker()]
    manager = PassManager(passes, dump_dir=tmp_path)
    with pytest.raises(PassError, match=r"pass 'breaker' left the IR malformed.*passes run before: \['dce', 'cse'\]"):
        manager.run(module, PassContext(weights=weights, target_ops=FUSED_OPS))
    assert (tmp_path / "03-breaker.broken.ir").exists()


def test_dump_ir_writes_one_numbered_file_per_pass(tmp_path: Path) -> None:
    module, weights = random_llama(llama_config(layers=1, tied=True))
    _, records = run_pipeline(module, weights, 2, dump_dir=tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["00-input.ir"] + [f"{i:02d}-{n}.ir" for i, n in enumerate(PIPELINES["O2"], start=1)]
    assert "add_rms_norm" in (tmp_path / names[-1]).read_text()
    assert [r.name for r in records] == PIPELINES["O2"]
    for r in records:
        d = r.to_dict()
        assert d["seconds"] >= 0 and len(d["nodes"]) == 2 and isinstance(d["stats"], dict)


def test_named_pipelines_drop_passes_the_target_cannot_run() -> None:
    only_norm = frozenset({"add_rms_norm"})
    names = [p.name for p in pipeline_for(2, only_norm)]
    assert names == ["share-tied-weights", "fuse-qkv", "fuse-add-rmsnorm", "cse", "dce"]
    assert [p.name for p in pipeline_for(0, FUSED_OPS)] == []
    assert [p.name for p in pipeline_for(1, frozenset())] == ["share-tied-weights", "cse", "dce"]
    module, weights = random_llama(llama_config(layers=1))
    out, _ = run_pipeline(module, weights, 2, target_ops=only_norm)
    counts = out.functions["decode"].op_counts()
    assert "swiglu" not in counts and "rope_attention" not in counts and counts["add_rms_norm"] == 2


def test_custom_pipeline_asking_for_an_unsupported_fused_op_is_an_error() -> None:
    module, weights = random_llama(llama_config(layers=1))
    with pytest.raises(PassError, match=r"fuse-gate-up.*\['swiglu'\].*cannot run"):
        run_pipeline(module, weights, "dce,fuse-gate-up", target_ops=frozenset())


def test_driver_runs_custom_pipelines_and_the_targets_preferred_list() -> None:
    module, weights = random_llama(llama_config(layers=1))
    _, manager = optimize(module, weights, CompileOptions(passes="fuse-qkv,dce"), FUSED_OPS, "t")
    assert [r.name for r in manager.records] == ["fuse-qkv", "dce"]
    _, manager = optimize(module, weights, CompileOptions(opt_level=3), FUSED_OPS, "t", ["fold-rope"])
    assert [r.name for r in manager.records] == ["fold-rope"]
    with pytest.raises(LlmcError, match="unknown optimization level"):
        pipeline_for(7, FUSED_OPS)


def test_parse_pipeline_arguments_and_errors() -> None:
    with pytest.raises(LlmcError, match="unknown pass 'fuse-everything'"):
        parse_pipeline("dce,fuse-everything")
    with pytest.raises(LlmcError, match="bad arguments for pass 'dce'"):
        parse_pipeline("dce(aggressive=true)")
    assert [p.name for p in parse_pipeline(" dce , cse ")] == ["dce", "cse"]


def test_torch_target_pipelines() -> None:
    target = TorchTarget()
    fused_ops = target.capabilities().fused_ops
    assert fused_ops <= FUSED_OPS
    o2 = [p.name for p in pipeline_for(2, fused_ops, target.preferred_passes(2))]
    assert "fuse-qkv" in o2 and "share-tied-weights" in o2
    assert "fuse-gate-up" not in o2 and "swiglu" in fused_ops  # runnable, but not worth it on torch
    assert target.preferred_passes(3) == o2 and target.preferred_passes(1) is None


def test_llmc_passes_lists_passes_and_pipelines() -> None:
    runner = CliRunner()
    result = runner.invoke(main, ["passes"])
    assert result.exit_code == 0, result.output
    for name in ("dce", "cse", "fuse-qkv", "fuse-gate-up", "fuse-add-rmsnorm", "fold-rope", "share-tied-weights"):
        assert name in result.output
        assert PASSES[name].doc in result.output
    for level in ("O0", "O1", "O2", "O3"):
        assert f"  {level}  " in result.output
    result = runner.invoke(main, ["passes", "--json", "--target", "torch"])
    data = json.loads(result.output)
    assert {p["name"] for p in data["pipelines"]} == {"O0", "O1", "O2", "O3"}
    assert data["target"]["name"] == "torch" and "O2" in data["target"]["pipelines"]
