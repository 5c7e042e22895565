"""The rule engine: matching (captures, variables, commutativity, attribute predicates,
several roots), checks with reasons, multi-result replacement and node ordering."""

from __future__ import annotations

import numpy as np
import pytest

from llmc.compiler.ir.builder import Builder
from llmc.compiler.ir.graph import Module, ParamInfo
from llmc.compiler.ir.ops import FUSED_OPS
from llmc.compiler.ir.printer import print_function
from llmc.compiler.ir.types import TensorType
from llmc.compiler.ir.verify import verify_module
from llmc.compiler.weights import WeightStore
from llmc.errors import PassError
from llmc.passes.base import PassContext
from llmc.passes.concat import concat_param
from llmc.passes.pattern import ANY, op, param, var
from llmc.passes.rule_engine import apply_rules
from llmc.passes.rules import Rule

F32 = "float32"


def _params() -> dict[str, ParamInfo]:
    return {
        "n": ParamInfo("n", TensorType((4,), F32)),
        "a": ParamInfo("a", TensorType((6, 4), F32)),
        "b": ParamInfo("b", TensorType((2, 4), F32)),
    }


def _ctx() -> PassContext:
    w = WeightStore()
    w["n"] = np.ones(4, np.float32)
    w["a"] = np.ones((6, 4), np.float32)
    w["b"] = np.ones((2, 4), np.float32)
    return PassContext(weights=w, target_ops=FUSED_OPS)


def _module(build) -> Module:
    params = _params()
    b = Builder(params)
    x = b.input("x", TensorType(("t", 4), F32))
    y = b.input("y", TensorType(("t", 4), F32))
    outputs = build(b, x, y)
    module = Module({"f": b.function("f", outputs)}, params)
    verify_module(module)
    return module


def _add_norm_rule(check=None) -> Rule:
    def rewrite(m, rb):
        fused = rb.node("add_rms_norm", m["a"], m["b"], m["w"], eps=m.attr("norm", "eps"))
        return {"norm": fused.out(0), "sum": fused.out(1)}

    pattern = op("rms_norm", op("add", var("a"), var("b"), capture="sum"), var("w"), capture="norm")
    return Rule.single("add-norm", pattern, rewrite, check)


def test_multi_result_replacement_remaps_both_values_and_hoists_operands() -> None:
    def build(b, x, y):
        s = b.op("add", x, y)
        h = b.op("rms_norm", s, b.param("n"), eps=1e-5)  # the param node comes after the add
        return {"h": h, "next": b.op("add", s, h)}  # the sum has another user

    module = _module(build)
    out, stats = apply_rules(module, _ctx(), [_add_norm_rule()])
    verify_module(out)
    assert stats.matches == {"add-norm": 1} and stats.rejections == {}
    assert print_function(out.functions["f"]) == "\n".join([
        "func f {",
        '  %0 = input {"name": "x"} : float32[t, 4]',
        '  %1 = input {"name": "y"} : float32[t, 4]',
        '  %2 = param {"name": "n"} : float32[4]',
        '  %3 = add_rms_norm(%0, %1, %2) {"eps": 1e-05} : float32[t, 4], float32[t, 4]',
        "  %4 = add(%3.1, %3.0) {} : float32[t, 4]",
        '  return {"h": %3.0, "next": %4}',
        "}",
    ])
    assert module.functions["f"].op_counts()["add"] == 2  # the input module is untouched


def test_commutative_operands_match_in_either_order() -> None:
    def rewrite(m, rb):
        return {"m": rb.op("add", rb.op("silu", m["g"]), m["u"])}

    rule = Rule.single("mul-silu", op("mul", op("silu", var("g")), var("u"), capture="m"), rewrite)

    def build(b, x, y):
        return {"o": b.op("mul", y, b.op("silu", x))}  # silu on the right

    _, stats = apply_rules(_module(build), _ctx(), [rule])
    assert stats.total_matches == 1
    strict = Rule.single("strict", op("mul", op("silu", var("g")), var("u"), capture="m", commutative=False),
                         rewrite)
    _, stats = apply_rules(_module(build), _ctx(), [strict])
    assert stats.total_matches == 0


def test_repeated_variable_must_bind_the_same_value() -> None:
    rule = Rule.single("square", op("mul", var("x"), var("x"), capture="m"),
                       lambda m, rb: {"m": rb.op("add", m["x"], m["x"])})

    def build(b, x, y):
        return {"same": b.op("mul", x, x), "diff": b.op("mul", x, y)}

    out, stats = apply_rules(_module(build), _ctx(), [rule])
    assert stats.total_matches == 1
    assert out.functions["f"].op_counts() == {"add": 1, "input": 2, "mul": 1}


def test_a_rule_that_recreates_its_pattern_is_an_error() -> None:
    rule = Rule.single("loop", op("mul", var("x"), var("y"), capture="m"),
                       lambda m, rb: {"m": rb.op("mul", m["y"], m["x"])})

    def build(b, x, y):
        return {"o": b.op("mul", x, y)}

    with pytest.raises(PassError, match="recreate its pattern"):
        apply_rules(_module(build), _ctx(), [rule])


def test_attribute_values_and_predicates() -> None:
    def build(b, x, y):
        return {"p": b.op("rms_norm", x, b.param("n"), eps=1e-5), "q": b.op("rms_norm", y, b.param("n"), eps=1e-6)}

    def rewrite(m, rb):
        return {"r": rb.op("rms_norm", m["x"], m["w"], eps=1e-3)}

    by_value = Rule.single("v", op("rms_norm", var("x"), var("w"), capture="r", eps=1e-6), rewrite)
    by_pred = Rule.single("p", op("rms_norm", var("x"), var("w"), capture="r", eps=lambda e: e < 1e-4), rewrite)
    assert apply_rules(_module(build), _ctx(), [by_value])[1].total_matches == 1
    assert apply_rules(_module(build), _ctx(), [by_pred])[1].total_matches == 2
    def swap(m, rb):
        return {"w": rb.add_param(ParamInfo("a2", m.param_info("w").type), m.weight("w"))}

    named = Rule.single("param-a", param("w", name="a"), swap)

    def build_lin(b, x, y):
        return {"o": b.op("linear", x, b.param("a")), "p": b.op("linear", y, b.param("b"))}

    assert apply_rules(_module(build_lin), _ctx(), [named])[1].total_matches == 1


def test_check_rejects_with_reason_and_counts() -> None:
    def build(b, x, y):
        return {"h": b.op("rms_norm", b.op("add", x, y), b.param("n"), eps=1e-5)}

    out, stats = apply_rules(_module(build), _ctx(), [_add_norm_rule(lambda m: "not today")])
    assert stats.total_matches == 0
    assert stats.rejections == {"add-norm: not today": 1}
    assert "add_rms_norm" not in out.functions["f"].op_counts()


def test_interior_value_with_outside_users_is_rejected() -> None:
    rule = Rule.single("silu-mul", op("mul", op("silu", var("g")), var("u"), capture="m"),
                       lambda m, rb: {"m": rb.op("add", m["g"], m["u"])})

    def build(b, x, y):
        s = b.op("silu", x)
        return {"m": b.op("mul", s, y), "s": b.op("add", s, y)}

    _, stats = apply_rules(_module(build), _ctx(), [rule])
    assert stats.total_matches == 0
    assert stats.rejections == {"silu-mul: silu result has users outside the pattern": 1}


def test_several_roots_share_a_variable() -> None:
    def rewrite(m, rb):
        fused = rb.op("linear", m["x"], concat_param(rb, [m.param_name("wa"), m.param_name("wb")], "ab"))
        split = rb.node("split", fused, sizes=(6, 2))
        return {"p": split.out(0), "q": split.out(1)}

    rule = Rule("pair", (op("linear", var("x"), param("wa"), capture="p"),
                         op("linear", var("x"), param("wb"), capture="q")), rewrite)

    def build(b, x, y):
        return {"a": b.op("linear", x, b.param("a")), "b": b.op("linear", x, b.param("b")),
                "c": b.op("linear", y, b.param("b"))}

    ctx = _ctx()
    out, stats = apply_rules(_module(build), ctx, [rule])
    verify_module(out)
    assert stats.total_matches == 1  # x's two linears; y has only one
    assert out.functions["f"].op_counts() == {"input": 2, "linear": 2, "param": 2, "split": 1}
    assert out.params["ab"].type == TensorType((8, 4), F32)
    assert ctx.weights["ab"].shape == (8, 4)


def test_wildcard_and_bad_rewrites() -> None:
    def build(b, x, y):
        return {"o": b.op("add", x, y)}

    wrong_type = Rule.single("bad", op("add", ANY, ANY, capture="s"),
                             lambda m, rb: {"s": rb.op("linear", m["s"], rb.param("a"))})
    with pytest.raises(PassError, match="replaces 's'"):
        apply_rules(_module(build), _ctx(), [wrong_type])
    not_captured = Rule.single("bad2", op("add", var("a"), ANY, capture="s"), lambda m, rb: {"a": m["a"]})
    with pytest.raises(PassError, match="not a captured op result"):
        apply_rules(_module(build), _ctx(), [not_captured])


def test_unknown_op_in_pattern_is_an_error() -> None:
    with pytest.raises(ValueError, match="unknown op"):
        op("convolution", var("x"))
