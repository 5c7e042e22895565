"""Fuzz artifacts: mutations of manifest.json (any key, any value, deep inside), of the file list,
and of the files themselves (flipped, truncated, removed, added, replaced by links), then loaded by
the engine (one generated token) and by ``llmc inspect``, in the sandbox worker: a clear LlmcError or
success, within the limits, nothing outside the case's folder touched."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import Cases, assert_clean
from tests.fuzz.sandbox import Sandbox
from tests.fuzz.strategies import json_values, mutate_json

BASES: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def base_artifacts(tmp_path_factory: pytest.TempPathFactory) -> None:
    """llmc synth's tiny Llama compiled for the torch target (and for onnx, where onnxruntime is installed)."""
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.registry import get_target
    from llmc.synth import synthesize

    root = tmp_path_factory.mktemp("artifact_bases")
    hf = synthesize("tiny", root / "hf", dtype="float32")
    BASES["torch"] = compile_model(hf, root / "torch", CompileOptions(opt_level=2))
    BASES["torch-int4"] = compile_model(hf, root / "torch-int4", CompileOptions(quant="int4"))
    if get_target("onnx").availability() is None:
        BASES["onnx"] = compile_model(hf, root / "onnx", CompileOptions(target="onnx", quant="int8"))


class Case:
    def __init__(self, note: str, apply) -> None:  # type: ignore[no-untyped-def]
        self.note, self.apply = note, apply

    def __repr__(self) -> str:
        return f"Case({self.note})"


@st.composite
def manifest_case(draw: st.DrawFn, art: Path) -> Case:
    base = json.loads((art / "manifest.json").read_text())
    kind = draw(st.sampled_from(["deep", "deep", "deep", "target", "files", "whole"]))
    spot: list[str] = []
    if kind == "deep":
        mutated = mutate_json(draw, base, path=spot)
    elif kind == "target":
        key = draw(st.sampled_from(["device", "block_size", "activation_dtype", "quant_kernels", "accuracy_level"]))
        mutated = {**base, "target": {**base["target"], "options": {**base["target"]["options"],
                                                                    key: draw(json_values(0))}}}
    elif kind == "files":
        files = dict(base["files"])
        name = draw(st.sampled_from(sorted(files)))
        action = draw(st.sampled_from(["drop", "rename", "empty", "outside"]))
        if action == "drop":
            del files[name]
        elif action == "rename":
            files[draw(st.sampled_from(["../x", "/etc/hostname", "a/../../b", "", ".", "manifest.json"]))] = files[name]
        elif action == "empty":
            files = {}
        else:
            files["../outside.bin"] = {"bytes": 4, "sha256": "0" * 64}
        mutated = {**base, "files": files}
    else:
        mutated = draw(json_values())
    text = json.dumps(mutated)

    def apply(art: Path) -> None:
        (art / "manifest.json").write_text(text)

    return Case(f"manifest {kind}: {'.'.join(spot) or text[:300]}", apply)


@st.composite
def file_case(draw: st.DrawFn, art: Path) -> Case:
    names = sorted(json.loads((art / "manifest.json").read_text())["files"])
    name = draw(st.sampled_from(names))
    action = draw(st.sampled_from(["flip", "truncate", "remove", "add", "link", "dir"]))
    spot = draw(st.floats(0, 1))

    def apply(art: Path) -> None:
        path = art / name
        if not path.is_file() or path.is_symlink():  # an earlier change removed or replaced it
            return
        if action == "flip":
            data = bytearray(path.read_bytes())
            if data:
                data[int(spot * (len(data) - 1))] ^= 0x41
            path.write_bytes(bytes(data))
        elif action == "truncate":
            path.write_bytes(path.read_bytes()[: int(spot * path.stat().st_size)])
        elif action == "remove":
            path.unlink()
        elif action == "add":
            (art / "target" / "extra.bin").write_bytes(b"extra")
        elif action == "link":
            outside = art.parent / "outside.bin"
            shutil.copy(path, outside)
            path.unlink()
            os.symlink(outside, path)
        else:
            path.unlink()
            path.mkdir()

    return Case(f"file {name}: {action} at {spot:.2f}", apply)


@st.composite
def artifact_case(draw: st.DrawFn) -> tuple[str, list[Case]]:
    base = draw(st.sampled_from(sorted(BASES)))
    changes = draw(st.lists(manifest_case(BASES[base]) | file_case(BASES[base]), min_size=1, max_size=2))
    return base, changes


@given(artifact_case())
def test_mutated_artifact_loads_or_fails_clearly(sandbox: Sandbox, cases: Cases, case: tuple[str, list[Case]]) -> None:
    base, changes = case
    folder = cases.new()
    art = Path(shutil.copytree(BASES[base], folder / "art"))
    for change in changes:
        change.apply(art)
    for op in ("load_artifact", "inspect"):
        outcome = sandbox.run(op, folder, None, path=str(art))
        assert_clean(outcome, f"{op} {base}: {changes}")
