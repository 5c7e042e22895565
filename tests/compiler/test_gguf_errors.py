"""Bad GGUF files fail with a clear LlmcError that names the problem."""

from __future__ import annotations

import struct
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from gguf import GGMLQuantizationType, GGUFWriter

from llmc.cli import main
from llmc.compiler.frontends.gguf import load_gguf
from llmc.compiler.frontends.source import load_source
from llmc.errors import InputError, UnsupportedError
from tests.compiler.gguf_util import hf_to_gguf
from tests.models import write_random_hf_model


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("bad_gguf")
    hf = write_random_hf_model(root / "hf", seed=1)
    return hf_to_gguf(hf, root / "ok.gguf")


@pytest.fixture(scope="module")
def tiny_hf_dir(tiny_gguf: Path) -> Path:
    return tiny_gguf.parent / "hf"


@pytest.mark.parametrize("fraction", [0.002, 0.3, 0.999])
def test_truncated_file(tiny_gguf: Path, tmp_path: Path, fraction: float) -> None:
    data = tiny_gguf.read_bytes()
    bad = tmp_path / "cut.gguf"
    bad.write_bytes(data[: int(len(data) * fraction)])
    with pytest.raises(InputError, match=r"cut\.gguf") as info:
        load_source(bad)
    assert "truncated" in str(info.value)


def test_bad_magic(tiny_gguf: Path, tmp_path: Path) -> None:
    bad = tmp_path / "magic.gguf"
    bad.write_bytes(b"GGUX" + tiny_gguf.read_bytes()[4:])
    with pytest.raises(InputError, match="magic"):
        load_source(bad)
    result = CliRunner().invoke(main, ["compile", str(bad), "-o", str(tmp_path / "out")])
    assert result.exit_code == 2 and "magic" in result.output and "Traceback" not in result.output


def _tensor_type_offset(data: bytes, name: str) -> int:
    """Byte offset of the ggml type field in the tensor info of ``name``."""
    key = struct.pack("<Q", len(name)) + name.encode()
    start = data.index(key) + len(key)
    n_dims = struct.unpack_from("<I", data, start)[0]
    return start + 4 + 8 * n_dims


def test_unknown_tensor_type(tiny_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    offset = _tensor_type_offset(bytes(data), "blk.1.ffn_up.weight")
    assert struct.unpack_from("<I", data, offset)[0] == int(GGMLQuantizationType.F32)
    struct.pack_into("<I", data, offset, 99)
    bad = tmp_path / "type.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(UnsupportedError, match=r"blk\.1\.ffn_up\.weight.*unknown ggml type 99"):
        load_gguf(bad)


def test_unsupported_tensor_type(tiny_gguf: Path, tmp_path: Path) -> None:
    path = tmp_path / "i32.gguf"
    w = GGUFWriter(str(path), "llama")
    for key, value in (("context_length", 16), ("embedding_length", 32), ("block_count", 1),
                       ("feed_forward_length", 32), ("attention.head_count", 2)):
        w.add_uint32(f"llama.{key}", value)
    w.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    w.add_uint32("llama.vocab_size", 8)
    w.add_tensor("blk.0.attn_q.weight", np.zeros((32, 32), dtype=np.int32), raw_dtype=GGMLQuantizationType.I32)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(UnsupportedError, match=r"blk\.0\.attn_q\.weight.*type I32.*supported: F32"):
        load_gguf(path)


def test_missing_metadata_key(tiny_hf_dir: Path, tmp_path: Path) -> None:
    bad = hf_to_gguf(tiny_hf_dir, tmp_path / "nokey.gguf", skip_keys=("block_count",))
    with pytest.raises(InputError, match=r"missing required metadata key 'llama\.block_count'"):
        load_gguf(bad)


def test_missing_tensor(tiny_gguf: Path, tmp_path: Path) -> None:
    from llmc.driver import CompileOptions, compile_model

    data = bytearray(tiny_gguf.read_bytes())
    name = b"blk.1.ffn_up.weight"
    at = data.index(name)
    data[at : at + len(name)] = b"blk.1.ffn_xx.weight"
    bad = tmp_path / "missing.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"missing weight for 'layers\.1\.up'"):
        compile_model(bad, tmp_path / "out", CompileOptions())


def test_non_llama_architecture(tiny_hf_dir: Path, tmp_path: Path) -> None:
    bad = hf_to_gguf(tiny_hf_dir, tmp_path / "gpt2.gguf", arch="gpt2")
    with pytest.raises(UnsupportedError, match=r"architecture 'gpt2' is not supported; supported: llama"):
        load_gguf(bad)


def test_unsupported_rope_scaling_and_tokenizer(tiny_hf_dir: Path, tmp_path: Path) -> None:
    from gguf import GGUFValueType as V

    yarn = hf_to_gguf(tiny_hf_dir, tmp_path / "yarn.gguf",
                      extra={"llama.rope.scaling.type": ("yarn", V.STRING),
                             "llama.rope.scaling.factor": (4.0, V.FLOAT32)})
    with pytest.raises(UnsupportedError, match="RoPE scaling type 'yarn'"):
        load_gguf(yarn)
    t5 = hf_to_gguf(tiny_hf_dir, tmp_path / "t5.gguf",
                    extra={"tokenizer.ggml.model": ("t5", V.STRING), "tokenizer.ggml.tokens": (["a", "b"], V.ARRAY)})
    with pytest.raises(UnsupportedError, match=r"tokenizer\.ggml\.model 't5' is not supported"):
        load_gguf(t5)


def test_gguf_versions(tiny_gguf: Path, tmp_path: Path) -> None:
    data = bytearray(tiny_gguf.read_bytes())
    assert struct.unpack_from("<I", data, 4)[0] == 3
    struct.pack_into("<I", data, 4, 2)  # v2 has the v3 layout (v3 only added big-endian files)
    v2 = tmp_path / "v2.gguf"
    v2.write_bytes(bytes(data))
    assert load_gguf(v2).config == load_gguf(tiny_gguf).config
    struct.pack_into("<I", data, 4, 1)
    v1 = tmp_path / "v1.gguf"
    v1.write_bytes(bytes(data))
    with pytest.raises(InputError, match=r"version 1.*GGUF v2 and v3"):
        load_gguf(v1)
