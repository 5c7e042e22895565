"""IR: builder, verifier, printer/parser round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.compiler.frontends.source import load_source
from llmc.compiler.ir.builder import Builder
from llmc.compiler.ir.graph import Module, Node, ParamInfo
from llmc.compiler.ir.parser import parse_module
from llmc.compiler.ir.printer import print_module
from llmc.compiler.ir.types import QuantSpec, TensorType
from llmc.compiler.ir.verify import verify_module
from llmc.driver import frontend_module
from llmc.errors import IRError


def _small_module() -> Module:
    params = {
        "w": ParamInfo("w", TensorType((8, 4), "float32")),
        "n": ParamInfo("n", TensorType((4,), "float32")),
        "q": ParamInfo("q", TensorType((6, 4), "float32"), QuantSpec(4, 2, False)),
    }
    b = Builder(params)
    x = b.input("x", TensorType(("tokens", 4), "float32"))
    h = b.op("rms_norm", x, b.param("n"), eps=1e-5)
    y = b.op("linear", h, b.param("w"))
    z = b.op("linear", h, b.param("q"))
    fused = b.node("add_rms_norm", x, h, b.param("n"), eps=1e-6)
    return Module({"f": b.function("f", {"y": y, "z": z, "sum": fused.out(1)})}, params, {"k": 1}, {"m": "x"})


def test_round_trip_small() -> None:
    module = _small_module()
    verify_module(module)
    text = print_module(module)
    again = parse_module(text)
    verify_module(again)
    assert print_module(again) == text
    assert again.params["q"].quant == QuantSpec(4, 2, False)


def test_round_trip_llama(tiny_hf: Path) -> None:
    module = frontend_module(load_source(tiny_hf), None)
    verify_module(module)
    text = print_module(module)
    assert print_module(parse_module(text)) == text
    counts = module.op_counts()["prefill"]
    assert counts["attention"] == 2 and counts["linear"] == 2 * 7 + 1


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda m: m.functions["f"].nodes.__setitem__(2, Node("bogus", (), {}, ())), "unknown op 'bogus'"),
        (lambda m: m.params.pop("w"), "param 'w' is not declared"),
        (lambda m: m.functions["f"].nodes.reverse(), "used before it is defined"),
        (lambda m: m.functions["f"].nodes[2].attrs.pop("eps"), "missing attributes ['eps']"),
        (lambda m: m.functions["f"].nodes[2].attrs.update(bad=1), "unknown attributes ['bad']"),
    ],
)
def test_verifier_rejects(mutate, message: str) -> None:
    module = _small_module()
    mutate(module)
    with pytest.raises(IRError, match="node #") as info:
        verify_module(module)
    assert message in str(info.value)


def test_verifier_rejects_wrong_result_type() -> None:
    module = _small_module()
    f = module.functions["f"]
    node = f.nodes[4]  # linear h @ w.T
    f.nodes[4] = Node(node.op, node.inputs, node.attrs, (TensorType(("tokens", 9), "float32"),))
    f.outputs["y"] = f.nodes[4].out()
    with pytest.raises(IRError, match=r"node #4 \(linear.*do not match"):
        verify_module(module)


def test_verifier_rejects_shape_mismatch() -> None:
    module = _small_module()
    f = module.functions["f"]
    x = f.nodes[0].out()
    w = f.nodes[3].out()  # param w [8, 4] used as a norm weight
    f.nodes.insert(4, Node("rms_norm", (x, w), {"eps": 1e-5}, (x.type,)))
    with pytest.raises(IRError, match="norm weight"):
        verify_module(module)


def test_builder_rejects_bad_shapes() -> None:
    params = {"w": ParamInfo("w", TensorType((8, 5), "float32"))}
    b = Builder(params)
    x = b.input("x", TensorType(("tokens", 4), "float32"))
    with pytest.raises(IRError, match="cannot build linear"):
        b.op("linear", x, b.param("w"))


def test_parser_reports_line() -> None:
    text = print_module(_small_module()).replace("rms_norm(%0, %", "rms_norm(%0, %77")
    with pytest.raises(IRError, match="not defined above"):
        parse_module(text)
    with pytest.raises(IRError, match="header"):
        parse_module("hello")
