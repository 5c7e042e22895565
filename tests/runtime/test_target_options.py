"""The target contract's option declarations (Target.compile_options / load_options) and their checks."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmc.errors import LlmcError, UnsupportedError
from llmc.runtime.registry import get_target, target_names
from llmc.runtime.target import TargetOption, check_options


def test_every_target_declares_its_options() -> None:
    for name in target_names():
        target = get_target(name)
        for option in (*target.compile_options, *target.load_options):
            assert isinstance(option, TargetOption) and option.doc, (name, option)
            assert option.kind in (int, float, bool, str)
        names = [o.name for o in target.compile_options]
        assert len(names) == len(set(names)) and "device" not in names  # --device is its own flag


@pytest.mark.parametrize(("kind", "given", "want"), [
    (int, "12", 12), (int, 7, 7), (bool, "0", False), (bool, "yes", True), (bool, 1, True), (float, "2.5", 2.5),
    (str, "sm_90a", "sm_90a"), (str, 80, "80"),
])
def test_values_are_converted(kind: type, given: object, want: object) -> None:
    assert TargetOption("x", kind, "doc").parse(given, "compile") == want


@pytest.mark.parametrize(("kind", "given"), [(int, "1.5"), (int, True), (bool, "maybe"), (bool, 2), (float, "nan"),
                                             (float, "inf"), (str, "")])
def test_bad_values_are_refused(kind: type, given: object) -> None:
    with pytest.raises(UnsupportedError, match="compile option x expects"):
        TargetOption("x", kind, "doc").parse(given, "compile")


def test_unknown_keys_list_the_valid_ones() -> None:
    onnx = get_target("onnx")
    with pytest.raises(UnsupportedError, match=r"does not take the load option block_size; its load options: "
                                               r"inter_op_threads, kv_capacity, optimization, tensorrt"):
        check_options(onnx, {"block_size": 16}, "load")
    assert check_options(onnx, {"accuracy_level": "4"}, "compile") == {"accuracy_level": 4}
    with pytest.raises(UnsupportedError, match="accuracy_level must be one of 0, 1, 2, 3, 4"):
        check_options(onnx, {"accuracy_level": 5}, "compile")


def test_loader_refuses_ignored_options_and_bad_devices(tiny_hf: Path, tmp_path: Path) -> None:
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.engine import Engine
    from llmc.runtime.loader import load_model

    art = compile_model(tiny_hf, tmp_path / "art", CompileOptions(opt_level=0))
    with pytest.raises(UnsupportedError, match="does not take the load option kv_capacity"):
        load_model(art, kv_capacity=8)  # an onnx option the torch target would ignore
    with pytest.raises(UnsupportedError, match="unknown device 'tpu'"):
        load_model(art, device="tpu")
    with pytest.raises(LlmcError, match="threads must be a positive integer"):
        load_model(art, threads=-1)
    with pytest.raises(UnsupportedError, match="unknown device 'nope'"):
        Engine.load(str(art), device="nope")
    assert load_model(art, block_size=8).executor.kv_spec().block_size == 8
