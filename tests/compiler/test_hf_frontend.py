"""The Hugging Face folder front end: config parsing and bad inputs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from llmc.compiler.frontends.source import load_source
from llmc.driver import frontend_module
from llmc.errors import InputError, UnsupportedError


@pytest.fixture
def folder(tiny_hf: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(tiny_hf, dst)
    return dst


def _edit_config(folder: Path, **changes: object) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path.write_text(json.dumps(cfg))


def test_loads_config(folder: Path) -> None:
    source = load_source(folder)
    c = source.config
    assert (c.hidden_size, c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim) == (64, 2, 4, 2, 16)
    assert c.rope_style == "half" and not c.tie_word_embeddings and source.tokenizer is None


def test_missing_config(folder: Path) -> None:
    (folder / "config.json").unlink()
    with pytest.raises(InputError, match=r"config\.json: not found"):
        load_source(folder)


def test_missing_key(folder: Path) -> None:
    _edit_config(folder, hidden_size=None)
    with pytest.raises(InputError, match="missing required key 'hidden_size'"):
        load_source(folder)


def test_unsupported_architecture(folder: Path) -> None:
    _edit_config(folder, architectures=["MistralForCausalLM"], model_type="mistral")
    with pytest.raises(UnsupportedError, match=r"MistralForCausalLM.*supported: LlamaForCausalLM"):
        load_source(folder)


def test_truncated_safetensors(folder: Path) -> None:
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(InputError, match=r"model\.safetensors: cannot read safetensors file.*truncated"):
        load_source(folder)


def test_wrong_tensor_shape(folder: Path) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((95, 64), np.float32)
    save_file(tensors, path)
    with pytest.raises(InputError, match=r"'layers\.1\.up' has shape \[95, 64\], expected \[96, 64\]"):
        frontend_module(load_source(folder), None)


def test_missing_tensor(folder: Path) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, path)
    with pytest.raises(InputError, match="missing weight for 'final_norm'"):
        frontend_module(load_source(folder), None)


def test_untied_without_lm_head(folder: Path) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    del tensors["lm_head.weight"]
    save_file(tensors, path)
    with pytest.raises(InputError, match=r"no lm_head\.weight and tie_word_embeddings is false"):
        load_source(folder)


def test_sharded_weights(folder: Path) -> None:
    path = folder / "model.safetensors"
    tensors = load_file(path)
    names = sorted(tensors)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, folder / shard)
    path.unlink()
    index = {"weight_map": {k: shard for shard, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    source = load_source(folder)
    np.testing.assert_array_equal(source.weights["layers.1.down"], tensors["model.layers.1.mlp.down_proj.weight"])
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(InputError, match="shard files missing"):
        load_source(folder)


def test_not_a_model(tmp_path: Path) -> None:
    (tmp_path / "x.bin").write_bytes(b"hello")
    with pytest.raises(InputError, match="not a model folder or a GGUF file"):
        load_source(tmp_path / "x.bin")
    with pytest.raises(InputError, match="no such file"):
        load_source(tmp_path / "nope")
