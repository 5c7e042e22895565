"""Write a synthetic model as a Hugging Face folder or as a llama.cpp-loadable GGUF file."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np
from safetensors.numpy import save_file

from llmc.compiler.atomic_output import AtomicOutput
from llmc.synth.presets import Preset
from llmc.synth.tokenizer import SynthVocab, build_vocab
from llmc.synth.weights import iter_tensors, storage_dtype, tensor_specs

SHARD_BYTES = 2 * 2**30  # shard safetensors above 2 GiB (Hugging Face shards at 5 GB; smaller bounds memory)

_GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


SYNTH_MARKER = "llmc_synth.json"
"""Written into every synthetic Hugging Face folder: the preset, seed, dtype and the files written,
so that a later ``llmc synth -o`` replaces only a folder it wrote."""
DESCRIPTION_PREFIX = "llmc synth:"
"""How ``general.description`` of a synthetic GGUF starts (a later ``llmc synth -o`` replaces only such files)."""


def is_synth_folder(path: Path) -> bool:
    """Whether ``path`` is a folder ``llmc synth`` wrote and nobody added files to."""
    try:
        record = json.loads((path / SYNTH_MARKER).read_text())
        listed = set(record["files"])
        present = {p.relative_to(path).as_posix() for p in path.rglob("*") if not p.is_dir()}
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return present <= listed | {SYNTH_MARKER}


def is_synth_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file ``llmc synth`` wrote (its ``general.description`` says so)."""
    from llmc.compiler.errors import LlmcError
    from llmc.compiler.frontends.gguf_reader import Metadata, open_gguf

    if not path.is_file():
        return False
    try:
        description = Metadata(open_gguf(path), path).string("general.description") or ""
    except LlmcError:
        return False
    return description.startswith(DESCRIPTION_PREFIX)


def _output(out: Path, folder: bool) -> AtomicOutput:
    test = is_synth_folder if folder else is_synth_gguf
    what = "a folder written by llmc synth" if folder else "a GGUF file written by llmc synth"
    return AtomicOutput(out, replaceable=test, what=what, folder=folder)


def hf_config(preset: Preset, dtype: str) -> dict[str, object]:
    return {**preset.hf_config, "torch_dtype": dtype}


def write_hf(preset: Preset, out: Path, seed: int, dtype: str) -> Path:
    """A Hugging Face Llama folder: config.json, (sharded) safetensors, tokenizer files."""
    vocab = build_vocab(preset)
    output = _output(out, folder=True)
    with output as tmp:
        (tmp / "config.json").write_text(json.dumps(hf_config(preset, dtype), indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": preset.bos_token_id, "eos_token_id": preset.hf_config["eos_token_id"],
            "do_sample": False,
        }, indent=2) + "\n")
        _write_tokenizer_files(vocab, tmp)
        _write_safetensors(preset, tmp, seed, dtype)
        files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
        (tmp / SYNTH_MARKER).write_text(json.dumps({"preset": preset.name, "seed": seed, "dtype": dtype,
                                                    "files": files}, indent=2) + "\n")
        output.commit()
    return out


def _write_tokenizer_files(vocab: SynthVocab, folder: Path) -> None:
    vocab.tokenizer().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(vocab.tokenizer_config(), indent=2) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": vocab.tokens[vocab.preset.bos_token_id], "eos_token": vocab.tokens[vocab.preset.eos_token_id],
    }, indent=2) + "\n")


def _write_safetensors(preset: Preset, folder: Path, seed: int, dtype: str) -> None:
    shards: list[dict[str, np.ndarray]] = [{}]
    sizes = [0]
    for name, array in iter_tensors(preset, seed, dtype):
        if sizes[-1] and sizes[-1] + array.nbytes > SHARD_BYTES:
            _flush(shards, folder)
            shards.append({})
            sizes.append(0)
        shards[-1][name] = array
        sizes[-1] += array.nbytes
    if len(shards) == 1:
        save_file(shards[0], str(folder / "model.safetensors"), metadata={"format": "pt"})
        return
    _flush(shards, folder)
    total = len(shards)
    weight_map: dict[str, str] = {}
    for i in range(total):
        tmp_name = folder / f"shard-{i}.tmp"
        final = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        os.replace(tmp_name, folder / final)
        for name in json.loads((folder / f"shard-{i}.names").read_text()):
            weight_map[name] = final
        (folder / f"shard-{i}.names").unlink()
    index = {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")


def _flush(shards: list[dict[str, np.ndarray]], folder: Path) -> None:
    """Write the last shard (its final name is known only at the end) and free its arrays."""
    i = len(shards) - 1
    if not shards[i]:
        return
    save_file(shards[i], str(folder / f"shard-{i}.tmp"), metadata={"format": "pt"})
    (folder / f"shard-{i}.names").write_text(json.dumps(list(shards[i])))
    shards[i] = {}


def permute_for_gguf(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Hugging Face (rotate-half) Q/K rows to llama.cpp's adjacent-pair layout.

    The same reshape as ``LlamaModel.permute`` in llama.cpp's ``convert_hf_to_gguf``."""
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def llama3_rope_factors(preset: Preset) -> np.ndarray | None:
    """llama.cpp's ``rope_freqs`` tensor for Llama 3 RoPE scaling (None when unscaled)."""
    c = preset.hf_config
    scaling = c.get("rope_scaling")
    if not scaling or scaling.get("rope_type") != "llama3":
        return None
    dim = int(c.get("head_dim") or int(c["hidden_size"]) // int(c["num_attention_heads"]))
    base = float(c["rope_theta"])
    freqs = 1.0 / (base ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor = float(scaling["factor"])
    low, high = float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    old = float(scaling["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old / low, old / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def gguf_name(hf_name: str) -> str:
    if hf_name == "model.embed_tokens.weight":
        return "token_embd.weight"
    if hf_name == "model.norm.weight":
        return "output_norm.weight"
    if hf_name == "lm_head.weight":
        return "output.weight"
    _, _, layer, rest = hf_name.split(".", 3)
    return f"blk.{layer}.{_GGUF_LAYER_NAMES[rest.removesuffix('.weight')]}.weight"


def write_gguf(preset: Preset, out: Path, seed: int, dtype: str) -> Path:
    """A GGUF v3 file with llama arch metadata, llama.cpp's Q/K layout and a gpt2 tokenizer.

    Tensors are written one at a time (header first), so memory holds one tensor."""
    import gguf

    c = preset.hf_config
    vocab = build_vocab(preset)
    heads, kv = int(c["num_attention_heads"]), int(c["num_key_value_heads"])
    ftype = {"float16": gguf.LlamaFileType.MOSTLY_F16, "bfloat16": gguf.LlamaFileType.MOSTLY_BF16,
             "float32": gguf.LlamaFileType.ALL_F32}[dtype]
    output = _output(out, folder=False)
    with output as tmp:
        writer = gguf.GGUFWriter(str(tmp), "llama")
        writer.add_name(f"synthetic {preset.name} (seed {seed})")
        writer.add_description(f"{DESCRIPTION_PREFIX} random weights with the shapes of {preset.notes}")
        writer.add_file_type(ftype)
        writer.add_vocab_size(preset.vocab_size)
        writer.add_context_length(int(c["max_position_embeddings"]))
        writer.add_embedding_length(int(c["hidden_size"]))
        writer.add_block_count(int(c["num_hidden_layers"]))
        writer.add_feed_forward_length(int(c["intermediate_size"]))
        writer.add_head_count(heads)
        writer.add_head_count_kv(kv)
        writer.add_rope_dimension_count(int(c.get("head_dim") or int(c["hidden_size"]) // heads))
        writer.add_rope_freq_base(float(c["rope_theta"]))
        writer.add_layer_norm_rms_eps(float(c["rms_norm_eps"]))
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(preset.pre_tokenizer)
        writer.add_token_list(vocab.tokens)
        writer.add_token_types(vocab.types)
        writer.add_token_merges([f"{a} {b}" for a, b in vocab.merges])
        writer.add_bos_token_id(preset.bos_token_id)
        writer.add_eos_token_id(preset.eos_token_id)
        writer.add_add_bos_token(preset.add_bos)
        writer.add_add_eos_token(False)
        writer.add_chat_template(preset.chat_template)

        factors = llama3_rope_factors(preset)
        for name, shape in tensor_specs(preset):
            np_dtype = storage_dtype(dtype) if len(shape) == 2 else np.dtype(np.float32)
            nbytes = int(np.prod(shape)) * np_dtype.itemsize
            if np_dtype.name == "bfloat16":  # gguf-py knows no ml_dtypes: pass the bits as uint16
                writer.add_tensor_info(gguf_name(name), shape, np.dtype(np.uint16), nbytes,
                                       raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor_info(gguf_name(name), shape, np_dtype, nbytes)
        if factors is not None:
            writer.add_tensor_info("rope_freqs.weight", factors.shape, factors.dtype, factors.nbytes)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for name, array in iter_tensors(preset, seed, dtype):
            if name.endswith("q_proj.weight"):
                array = permute_for_gguf(array, heads)
            elif name.endswith("k_proj.weight"):
                array = permute_for_gguf(array, kv)
            writer.write_tensor_data(_raw_view(array))
        if factors is not None:
            writer.write_tensor_data(factors)
        writer.close()
        output.commit()
    return out


def _raw_view(array: np.ndarray) -> np.ndarray:
    """bfloat16 arrays go to the writer as their uint16 bit patterns (gguf-py knows no ml_dtypes)."""
    if array.dtype.name == "bfloat16":
        return array.view(np.uint16)
    return array
