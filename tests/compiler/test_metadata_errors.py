"""Wrong types, zeros and unsupported values in GGUF metadata, config.json and safetensors headers
end in one line naming the key (issue 19, items 2, 5 and 6), before anything large is read."""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
from gguf import GGUFValueType as V

from llmc.compiler.frontends.gguf import load_gguf
from llmc.compiler.frontends.source import load_source
from llmc.errors import InputError, LlmcError, UnsupportedError
from tests.fuzz.gguf_doc import KV, GGUFDoc


@pytest.fixture(scope="module")
def synth_gguf(tmp_path_factory: pytest.TempPathFactory) -> GGUFDoc:
    from llmc.synth import synthesize

    return GGUFDoc.read(synthesize("tiny", tmp_path_factory.mktemp("meta") / "tiny.gguf", fmt="gguf",
                                   dtype="float32"))


@pytest.fixture(scope="module")
def synth_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmc.synth import synthesize

    return synthesize("tiny", tmp_path_factory.mktemp("meta_hf") / "hf", dtype="float32")


@pytest.mark.parametrize(("key", "vtype", "value", "message"), [
    ("llama.attention.head_count", V.UINT32, 0, r"'llama\.attention\.head_count' must be at least 1, got 0"),
    ("llama.attention.head_count", V.STRING, "four", r"'llama\.attention\.head_count' must be an integer, got a str"),
    ("llama.embedding_length", V.FLOAT32, 64.0, r"'llama\.embedding_length' must be an integer, got a float32"),
    ("llama.block_count", V.INT32, -2, r"'llama\.block_count' must be at least 1, got -2"),
    ("llama.context_length", V.UINT64, 2**40, r"'llama\.context_length' must be at most 1048576, got 1099511627776"),
    ("llama.attention.layer_norm_rms_epsilon", V.FLOAT32, float("nan"), r"must be a positive finite number"),
    ("llama.rope.freq_base", V.STRING, "1e4", r"'llama\.rope\.freq_base' must be a number, got a string"),
    ("general.architecture", V.UINT32, 7, r"'general\.architecture' must be a string"),
    ("tokenizer.ggml.bos_token_id", V.STRING, "<s>", r"'tokenizer\.ggml\.bos_token_id' must be an integer"),
    ("tokenizer.ggml.add_bos_token", V.UINT8, 5, r"'tokenizer\.ggml\.add_bos_token' must be a bool, got 5"),
    ("tokenizer.ggml.model", V.ARRAY, None, r"'tokenizer\.ggml\.model' must be a string, got an array"),
])
def test_gguf_wrong_metadata_types_name_the_key(synth_gguf: GGUFDoc, tmp_path: Path, key: str, vtype: int,
                                                value: object, message: str) -> None:
    doc = synth_gguf.set(key, vtype, [1, 2] if vtype == V.ARRAY else value, V.INT32 if vtype == V.ARRAY else None)
    with pytest.raises(InputError, match=message) as info:
        load_gguf(doc.write(tmp_path / "bad.gguf"))
    assert "bad.gguf" in str(info.value) and "\n" not in str(info.value)


def test_gguf_tokenizer_arrays_of_the_wrong_type(synth_gguf: GGUFDoc, tmp_path: Path) -> None:
    doc = synth_gguf.set("tokenizer.ggml.tokens", V.ARRAY, [1, 2, 3], V.INT32)
    with pytest.raises(InputError, match=r"'tokenizer\.ggml\.tokens' must be an array of strings, got an array of "
                                         r"int32 values"):
        load_gguf(doc.write(tmp_path / "tokens.gguf"))
    doc = synth_gguf.set("tokenizer.ggml.merges", V.ARRAY, ["a b c"], V.STRING)
    with pytest.raises(InputError, match="is not two tokens separated by a space"):
        load_gguf(doc.write(tmp_path / "merges.gguf"))


@pytest.mark.parametrize("count", [2**62, 2**40, 2**32])
def test_gguf_counts_are_checked_against_the_file_size(count: int, tmp_path: Path) -> None:
    """The issue's 49-byte file: a metadata array claiming 2^62 elements (gguf-py loops, memory grows)."""
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"a" + struct.pack("<IIQ", V.ARRAY,
                                                                                             V.UINT8, count)
    path = tmp_path / "tiny.gguf"
    path.write_bytes(raw)
    assert len(raw) == 49
    with pytest.raises(InputError, match=rf"'a' element count {count} cannot fit in the 0 bytes left"):
        load_source(path)


@pytest.mark.parametrize(("change", "message"), [
    (lambda d: setattr(d, "kv_count", 2**62), "metadata key count 4611686018427387904 cannot fit"),
    (lambda d: setattr(d, "tensor_count", 2**40), "tensor count 1099511627776 cannot fit"),
    (lambda d: setattr(d.kv("general.name"), "count", 2**63), r"'general\.name' length 9223372036854775808 cannot"),
    (lambda d: setattr(d.tensors[0], "dims", [64, 2**40]), r"'token_embd\.weight' ends past the end of the file"),
    (lambda d: setattr(d.tensors[0], "dims", [64, 0]), r"'token_embd\.weight' has a dimension of 0"),
    (lambda d: setattr(d.tensors[0], "n_dims", 9), r"'token_embd\.weight' has 9 dimensions; GGUF allows 1 to 4"),
    (lambda d: setattr(d.tensors[1], "offset", 8), r"data offset 8 is not a multiple of the alignment 32"),
    (lambda d: d.kvs.append(KV("general.alignment", V.UINT32, 3)), "general.alignment must be a uint32 power of two"),
    (lambda d: d.kvs.append(KV("general.name", V.STRING, "again")), r"'general\.name' appears twice"),
])
def test_gguf_structure_errors(synth_gguf: GGUFDoc, tmp_path: Path, change, message: str) -> None:  # type: ignore[no-untyped-def]
    import copy

    doc = copy.deepcopy(synth_gguf)
    change(doc)
    with pytest.raises(InputError, match=message):
        load_gguf(doc.write(tmp_path / "bad.gguf"))


def test_nested_arrays_are_bounded(tmp_path: Path) -> None:
    raw = b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + struct.pack("<Q", 1) + b"k" + struct.pack("<I", V.ARRAY)
    raw += struct.pack("<IQ", V.ARRAY, 1) * 6 + struct.pack("<IQ", V.UINT8, 0)
    path = tmp_path / "nested.gguf"
    path.write_bytes(raw)
    with pytest.raises(InputError, match="nests arrays more than 4 deep"):
        load_gguf(path)


def _write_config(folder: Path, edit) -> Path:  # type: ignore[no-untyped-def]
    config = json.loads((folder / "config.json").read_text())
    result = edit(config)
    (folder / "config.json").write_text(json.dumps(config if result is None else result))
    return folder


@pytest.mark.parametrize(("edit", "error", "message"), [
    (lambda c: [], InputError, r"config\.json: must hold a JSON object, got list"),
    (lambda c: c.update(hidden_size="abc"), InputError, "hidden_size must be an integer, got 'abc'"),
    (lambda c: c.update(num_attention_heads=0), InputError, "num_attention_heads must be positive, got 0"),
    (lambda c: c.update(num_hidden_layers=True), InputError, "num_hidden_layers must be an integer, got True"),
    (lambda c: c.update(max_position_embeddings=2**40), InputError, r"max_position \(the context length\) must be in"),
    (lambda c: c.update(rope_scaling="linear"), InputError, "rope_scaling must be an object"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "low_freq_factor": 1.0}), InputError,
     "llama3 rope_scaling lacks factor, high_freq_factor, original_max_position_embeddings"),
    (lambda c: c.update(rope_scaling={"rope_type": "llama3", "factor": "x", "low_freq_factor": 1.0,
                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
     InputError, "rope_scaling.factor must be a number, got 'x'"),
    (lambda c: c.update(rope_scaling={"rope_type": "yarn", "factor": 2.0}), UnsupportedError,
     "'yarn' is not supported"),
    (lambda c: c.update(rms_norm_eps="small"), InputError, "rms_norm_eps must be a number"),
    (lambda c: c.update(eos_token_id=[1, "x"]), InputError, "eos_token_id must be a token id or a list"),
    (lambda c: c.update(tie_word_embeddings="yes"), InputError, "tie_word_embeddings must be true or false"),
])
def test_config_json_errors_name_the_key(synth_hf: Path, tmp_path: Path, edit, error: type[LlmcError],  # type: ignore[no-untyped-def]
                                         message: str) -> None:
    folder = _write_config(Path(shutil.copytree(synth_hf, tmp_path / "hf")), edit)
    with pytest.raises(error, match=message) as info:
        load_source(folder)
    assert "config.json" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("dtype", ["BOOL", "U16", "F8_E4M3", "I64"])
def test_unsupported_safetensors_dtypes_are_named(synth_hf: Path, tmp_path: Path, dtype: str) -> None:
    folder = Path(shutil.copytree(synth_hf, tmp_path / "hf"))
    raw = (folder / "model.safetensors").read_bytes()
    n = struct.unpack_from("<Q", raw)[0]
    header = json.loads(raw[8:8 + n])
    name = "model.layers.0.input_layernorm.weight"
    start, end = header[name]["data_offsets"]
    itemsize = {"BOOL": 1, "U16": 2, "F8_E4M3": 1, "I64": 8}[dtype]
    count = (end - start) // itemsize
    header[name] = {"dtype": dtype, "shape": [count], "data_offsets": [start, end]}
    text = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n:])
    with pytest.raises(UnsupportedError, match=rf"tensor '{name}' has dtype {dtype}; supported: F32, F16, BF16"):
        load_source(folder)


def test_tokenizer_config_wrong_types(synth_hf: Path, tmp_path: Path) -> None:
    folder = Path(shutil.copytree(synth_hf, tmp_path / "hf"))
    path = folder / "tokenizer_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "bos_token": 5}))
    with pytest.raises(InputError, match="bos_token must be a token's text, got 5"):
        load_source(folder)
    path.write_text(json.dumps({**config, "chat_template": 3}))
    with pytest.raises(InputError, match="chat_template must be a string"):
        load_source(folder)
    path.write_text("[]")
    with pytest.raises(InputError, match="must hold a JSON object"):
        load_source(folder)
