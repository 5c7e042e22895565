"""Fuzz GGUF files: structured mutations of the header, the metadata and the tensor infos, compiled
(and, when that succeeds, run for one token) in the sandbox worker. Every case must end in a clear
LlmcError or success, within the time and memory limits, touching nothing but its output folder."""

from __future__ import annotations

import copy
import struct
from dataclasses import replace

import pytest
from gguf import GGMLQuantizationType, GGUFValueType
from hypothesis import given
from hypothesis import strategies as st

from tests.fuzz.conftest import Cases, assert_clean
from tests.fuzz.gguf_doc import KV, GGUFDoc
from tests.fuzz.sandbox import Sandbox
from tests.fuzz.strategies import edge_floats, edge_ints, edge_strings

V = GGUFValueType
ALL_TYPES = [int(t) for t in V]
BASES: dict[str, GGUFDoc] = {}


@pytest.fixture(scope="module", autouse=True)
def base_docs(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two valid files: llmc synth's tiny Llama (F32, gpt2 tokenizer) and a converted HF model with
    Q8_0/Q4_0/Q4_1 tensors and Llama 3 rope_freqs (no tokenizer)."""
    from llmc.synth import synthesize
    from tests.compiler.gguf_util import hf_to_gguf
    from tests.models import write_random_hf_model

    root = tmp_path_factory.mktemp("gguf_bases")
    BASES["synth"] = GGUFDoc.read(synthesize("tiny", root / "tiny.gguf", fmt="gguf", dtype="float32"))
    hf = write_random_hf_model(root / "hf", seed=2, hidden_size=64, intermediate_size=96,
                               rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                             "high_freq_factor": 4.0, "original_max_position_embeddings": 32})
    q = GGMLQuantizationType
    BASES["quant"] = GGUFDoc.read(hf_to_gguf(hf, root / "q.gguf", qtypes={"attn_q": q.Q8_0, "attn_k": q.Q4_0,
                                                                        "ffn_up": q.Q4_1, "ffn_down": q.F16}))


def _scalar(draw: st.DrawFn) -> tuple[int, object]:
    vtype = draw(st.sampled_from(ALL_TYPES[:8] + ALL_TYPES[10:]))
    if vtype == V.STRING:
        return vtype, draw(edge_strings)
    if vtype in (V.FLOAT32, V.FLOAT64):
        return vtype, draw(edge_floats)
    return vtype, draw(edge_ints)


class Case:
    """A mutated file's bytes, whether to keep native quant blocks, and what was changed (a short repr)."""

    def __init__(self, raw: bytes, native: bool, notes: list[str]) -> None:
        self.raw, self.native, self.notes = raw, native, notes

    def __repr__(self) -> str:
        return f"Case({len(self.raw)} bytes, native={self.native}, {'; '.join(self.notes)})"


@st.composite
def mutated(draw: st.DrawFn) -> Case:
    base = draw(st.sampled_from(sorted(BASES)))
    doc = copy.deepcopy(BASES[base])
    notes = [base]
    for _ in range(draw(st.integers(1, 3))):
        doc = draw(_mutation(doc, notes))
    return Case(doc.to_bytes(), draw(st.booleans()), notes)


@st.composite
def _mutation(draw: st.DrawFn, doc: GGUFDoc, notes: list[str]) -> GGUFDoc:
    """One structured change of ``doc`` (described in ``notes``)."""
    if isinstance(doc, _Raw):  # already bytes: nothing structured left to change
        return doc
    kinds = ["header", "duplicate", "truncate", "flip", "version", "alignment"]
    if doc.kvs:
        kinds += ["value", "value", "drop", "array_items"]
    if any(kv.vtype in (V.STRING, V.ARRAY) for kv in doc.kvs):
        kinds.append("count")
    if doc.tensors:
        kinds += ["tensor", "tensor"]
    kind = draw(st.sampled_from(kinds))
    note = kind
    if kind == "value":
        i = draw(st.integers(0, len(doc.kvs) - 1))
        vtype, value = _scalar(draw)
        if draw(st.integers(0, 4)) == 0:
            vtype = draw(st.sampled_from([13, 99, 2**31]))  # unknown value types
        doc.kvs[i] = KV(doc.kvs[i].key, vtype, value)
        note = f"{doc.kvs[i].key} = type {vtype} {value!r}"
    elif kind == "count":
        sized = [i for i, kv in enumerate(doc.kvs) if kv.vtype in (V.STRING, V.ARRAY)]
        i = draw(st.sampled_from(sized))
        true = len(doc.kvs[i].value) if doc.kvs[i].vtype == V.ARRAY else len(str(doc.kvs[i].value).encode())
        doc.kvs[i].count = draw(st.sampled_from([0, max(0, true - 1), true + 1, 2**32, 2**62, 2**64 - 1]))
        note = f"{doc.kvs[i].key} count {doc.kvs[i].count} (true {true})"
    elif kind == "header":
        if draw(st.booleans()):
            doc.tensor_count = draw(st.sampled_from([0, len(doc.tensors) - 1, len(doc.tensors) + 1, 2**62]))
        else:
            doc.kv_count = draw(st.sampled_from([0, len(doc.kvs) - 1, len(doc.kvs) + 1, 2**62, 2**64 - 1]))
        note = f"tensor_count {doc.tensor_count}, kv_count {doc.kv_count}"
    elif kind == "tensor":
        i = draw(st.integers(0, len(doc.tensors) - 1))
        t = doc.tensors[i]
        field = draw(st.sampled_from(["dims", "n_dims", "type", "offset", "name"]))
        if field == "dims":
            dims = list(t.dims)
            dims[draw(st.integers(0, len(dims) - 1))] = draw(st.sampled_from([0, 1, 3, 31, 2**20, 2**32, 2**62]))
            doc.tensors[i] = replace(t, dims=dims)
        elif field == "n_dims":
            doc.tensors[i] = replace(t, n_dims=draw(st.sampled_from([0, 5, 2**31, len(t.dims) + 1])))
        elif field == "type":
            doc.tensors[i] = replace(t, ggml_type=draw(st.integers(0, 45) | st.sampled_from([2**31, 2**32 - 1])))
        elif field == "offset":
            doc.tensors[i] = replace(t, offset=draw(st.sampled_from([0, 1, t.offset + 32, 2**40, 2**64 - 1])))
        else:
            doc.tensors[i] = replace(t, name=draw(st.sampled_from(["", doc.tensors[0].name, "blk.0.attn_q.weight",
                                                                   "blk.99.attn_q.weight", "output.weight"])))
        note = f"tensor {t.name} {field}: {doc.tensors[i]}"
    elif kind == "drop":
        note = f"drop {doc.kvs.pop(draw(st.integers(0, len(doc.kvs) - 1))).key}"
    elif kind == "duplicate" and doc.kvs:
        doc.kvs.append(copy.deepcopy(doc.kvs[draw(st.integers(0, len(doc.kvs) - 1))]))
        note = f"duplicate {doc.kvs[-1].key}"
    elif kind == "array_items":
        arrays = [i for i, kv in enumerate(doc.kvs) if kv.vtype == V.ARRAY]
        if arrays:
            i = draw(st.sampled_from(arrays))
            kv = doc.kvs[i]
            item_type, items = draw(st.sampled_from([
                (kv.item_type, kv.value[: draw(st.integers(0, 3))]),  # too few
                (V.INT32, [draw(edge_ints) for _ in range(4)]),
                (V.STRING, ["a b c", "", "\u00e9"]),
                (V.FLOAT32, [float("nan"), 1.0]),
                (V.BOOL, [1, 0, 1]),
            ]))
            doc.kvs[i] = KV(kv.key, V.ARRAY, items, item_type)
            note = f"{kv.key} = array of type {item_type} {items!r}"
    elif kind == "truncate":
        raw = doc.to_bytes()
        cut = draw(st.integers(0, max(0, len(raw) - 1)))
        notes.append(f"truncate at {cut} of {len(raw)}")
        return _Raw(raw[:cut])
    elif kind == "flip":
        raw = bytearray(doc.to_bytes())
        header = len(raw) - len(doc.data)
        spots = [draw(st.integers(0, header - 1)) for _ in range(draw(st.integers(1, 8)))]
        for spot in spots:
            raw[spot] ^= 1 << draw(st.integers(0, 7))
        notes.append(f"flip bits at {spots}")
        return _Raw(bytes(raw))
    elif kind == "version":
        doc.version = draw(st.sampled_from([0, 1, 2, 4, 2**16, 2**32 - 1]))
        note = f"version {doc.version}"
    else:
        doc.kvs.append(KV("general.alignment", draw(st.sampled_from([V.UINT32, V.UINT64, V.STRING])),
                          draw(st.sampled_from([0, 1, 3, 16, 64, 2**31]))))
        note = f"alignment {doc.kvs[-1]}"
    notes.append(note)
    return doc


class _Raw(GGUFDoc):
    """Bytes that no longer parse as a doc (truncated or flipped): further mutations keep them."""

    def __init__(self, raw: bytes) -> None:
        super().__init__()
        self.raw = raw
        self.kvs = [KV("x", V.UINT8, 0)]
        self.tensors = []

    def to_bytes(self) -> bytes:
        return self.raw

    def __repr__(self) -> str:
        return f"raw {len(self.raw)} bytes"


@given(mutated())
def test_mutated_gguf_compiles_or_fails_clearly(sandbox: Sandbox, cases: Cases, case: Case) -> None:
    folder = cases.new()
    source = folder / "model.gguf"
    source.write_bytes(case.raw)
    outcome = sandbox.run("compile", folder, folder / "out", source=str(source), out=str(folder / "out"),
                          native=case.native)
    assert_clean(outcome, f"{source}: {case}")


@given(st.sampled_from([2**62, 2**40, 2**64 - 1]), st.sampled_from([V.UINT8, V.STRING, V.ARRAY, V.FLOAT64]))
def test_huge_claimed_arrays_fail_at_once(sandbox: Sandbox, cases: Cases, count: int, item: int) -> None:
    """The issue's 49-byte file: an array claiming 2^62 elements (gguf-py loops while memory grows)."""
    folder = cases.new()
    path = folder / "tiny.gguf"
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 4) + b"abcd"
    raw += struct.pack("<IIQ", V.ARRAY, item, count)
    path.write_bytes(raw + b"\0" * max(0, 49 - len(raw)))
    for op, args in (("load_source", {"path": str(path)}),
                     ("cli", {"args": ["tokenize", str(path), "--text", "hi"]}),
                     ("compile", {"source": str(path), "out": str(folder / "out")})):
        outcome = sandbox.run(op, folder, folder / "out", **args)
        assert outcome.status == "error" and "cannot fit" in outcome.detail, (op, outcome)
