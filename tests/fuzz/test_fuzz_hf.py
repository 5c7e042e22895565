"""Fuzz Hugging Face folders: mutations of config.json, the safetensors header (length prefix,
dtypes, shapes, offsets), tokenizer.json, tokenizer_config.json and a shard index, compiled (and run
for a token) in the sandbox worker: a clear LlmcError or success, within the limits, nothing else touched."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import Cases, assert_clean
from tests.fuzz.sandbox import Sandbox
from tests.fuzz.strategies import edge_ints, json_values, mutate_json

SAFETENSORS_DTYPES = ["BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "I16", "U16", "F16", "BF16", "I32", "U32", "F32",
                      "F64", "I64", "U64", "F4", "XX", ""]
BASE: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def base_folder(tmp_path_factory: pytest.TempPathFactory) -> None:
    """llmc synth's tiny Llama as a Hugging Face folder (config, safetensors, tokenizer files)."""
    from llmc.synth import synthesize

    BASE["hf"] = synthesize("tiny", tmp_path_factory.mktemp("hf_base") / "tiny", dtype="float32")


class Case:
    """A description of the change (a short repr) and the function that applies it to a folder copy."""

    def __init__(self, note: str, apply) -> None:  # type: ignore[no-untyped-def]
        self.note, self.apply = note, apply

    def __repr__(self) -> str:
        return f"Case({self.note})"


def _split_safetensors(raw: bytes) -> tuple[dict, bytes]:  # type: ignore[type-arg]
    n = struct.unpack_from("<Q", raw)[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _join_safetensors(header: dict, data: bytes, length: int | None = None) -> bytes:  # type: ignore[type-arg]
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


@st.composite
def config_case(draw: st.DrawFn) -> Case:
    config = json.loads((BASE["hf"] / "config.json").read_text())
    if draw(st.integers(0, 5)) == 0:
        text = draw(st.sampled_from(["[]", '"config"', "7", "null", "{", '{"hidden_size": 64,}', "\xff\xfe"]))
        return Case(f"config.json = {text!r}", lambda d: (d / "config.json").write_text(text, "latin-1"))
    key = draw(st.sampled_from([*sorted(config), "rope_scaling", "head_dim", "rope_parameters"]))
    value = draw(json_values() | st.sampled_from([
        0, -1, 2**40, "abc", "linear", {"rope_type": "llama3"}, {"rope_type": "llama3", "factor": 0},
        {"rope_type": "yarn", "factor": 2.0}, {"type": "linear", "factor": 2.0}, [1, 2], 64.5, True]))
    mutated = {**config, key: value} if draw(st.integers(0, 4)) else {k: v for k, v in config.items() if k != key}
    if draw(st.booleans()):
        mutated = mutate_json(draw, mutated)
    text = json.dumps(mutated)
    return Case(f"config.json {key} -> {text[:200]}", lambda d: (d / "config.json").write_text(text))


@st.composite
def safetensors_case(draw: st.DrawFn) -> Case:
    raw = (BASE["hf"] / "model.safetensors").read_bytes()
    header, data = _split_safetensors(raw)
    names = sorted(k for k in header if k != "__metadata__")
    name = draw(st.sampled_from(names))
    kind = draw(st.sampled_from(["dtype", "shape", "offsets", "length", "truncate", "drop", "header_json"]))
    length = None
    if kind == "dtype":
        header[name] = {**header[name], "dtype": draw(st.sampled_from(SAFETENSORS_DTYPES))}
    elif kind == "shape":
        shape = list(header[name]["shape"])
        shape = draw(st.sampled_from([[], [0], shape[::-1], [*shape, 1], [2**40, 2**40], [-1, 4], [2**63, 2]]))
        header[name] = {**header[name], "shape": shape}
    elif kind == "offsets":
        start, end = header[name]["data_offsets"]
        header[name] = {**header[name], "data_offsets": draw(st.sampled_from(
            [[end, start], [0, 2**62], [start, end + 4], [start + 4, end], [-4, end], [start, start]]))}
    elif kind == "length":
        length = draw(st.sampled_from([0, 1, 7, 2**31, 2**40, 2**64 - 1, len(json.dumps(header)) + 1]))
    elif kind == "drop":
        del header[name]
    elif kind == "header_json":
        header = draw(json_values())  # type: ignore[assignment]
    blob = _join_safetensors(header, data, length)
    if kind == "truncate":
        blob = raw[: draw(st.integers(0, len(raw) - 1))]

    def apply(d: Path) -> None:
        (d / "model.safetensors").write_bytes(blob)

    return Case(f"safetensors {kind} {name}: {json.dumps(header)[:200] if isinstance(header, dict) else header!r}"
                f" length={length}", apply)


@st.composite
def tokenizer_case(draw: st.DrawFn) -> Case:
    which = draw(st.sampled_from(["tokenizer.json", "tokenizer_config.json"]))
    value = json.loads((BASE["hf"] / which).read_text())
    if which == "tokenizer_config.json" and draw(st.booleans()):
        key = draw(st.sampled_from(["bos_token", "eos_token", "chat_template"]))
        value[key] = draw(json_values() | st.sampled_from([{"content": 5}, [{"name": "default"}], [{"x": 1}], 7]))
    else:
        value = mutate_json(draw, value)
    text = json.dumps(value)
    if draw(st.integers(0, 6)) == 0:
        text = text[: draw(st.integers(0, len(text)))]
    return Case(f"{which}: {text[:200]}", lambda d: (d / which).write_text(text))


@st.composite
def index_case(draw: st.DrawFn) -> Case:
    header, _ = _split_safetensors((BASE["hf"] / "model.safetensors").read_bytes())
    weight_map: object = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map = draw(st.sampled_from([
        weight_map, {**weight_map, "x": "../outside.safetensors"}, {**weight_map, "y": "/etc/passwd"},
        {**weight_map, "z": 5}, [], "model.safetensors", {**weight_map, "w": "missing.safetensors"}]))
    index = draw(st.sampled_from([{"weight_map": weight_map}, {"metadata": {}}, weight_map]))
    text = json.dumps(index)
    return Case(f"index: {text[:200]}", lambda d: (d / "model.safetensors.index.json").write_text(text))


@given(st.lists(config_case() | safetensors_case() | tokenizer_case() | index_case() | st.builds(
    lambda n: Case(f"int {n}", lambda d: None), edge_ints), min_size=1, max_size=3))
def test_mutated_hf_folder_compiles_or_fails_clearly(sandbox: Sandbox, cases: Cases, changes: list[Case]) -> None:
    folder = cases.new()
    source = Path(shutil.copytree(BASE["hf"], folder / "model"))
    for change in changes:
        change.apply(source)
    outcome = sandbox.run("compile", folder, folder / "out", source=str(source), out=str(folder / "out"))
    assert_clean(outcome, f"{source}: {changes}")
