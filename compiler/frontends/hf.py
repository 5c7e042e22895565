"""Hugging Face Llama folders: config.json, (sharded) safetensors, tokenizer.json."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open

from llmc.compiler.config import ModelConfig, RopeScaling
from llmc.compiler.errors import InputError, UnsupportedError
from llmc.compiler.frontends.source import ModelSource
from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.compiler.weights import WeightStore

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM",)

_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "q",
    "self_attn.k_proj": "k",
    "self_attn.v_proj": "v",
    "self_attn.o_proj": "o",
    "post_attention_layernorm": "mlp_norm",
    "mlp.gate_proj": "gate",
    "mlp.up_proj": "up",
    "mlp.down_proj": "down",
}
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.(.+)\.weight$")
_TOP_NAMES = {"model.embed_tokens.weight": "embed", "model.norm.weight": "final_norm", "lm_head.weight": "lm_head"}
_IGNORED = re.compile(r"rotary_emb\.inv_freq$")


def canonical_name(hf_name: str) -> str | None:
    """llmc's name for a Hugging Face Llama tensor, or None if it is not a Llama weight."""
    if hf_name in _TOP_NAMES:
        return _TOP_NAMES[hf_name]
    match = _LAYER_RE.match(hf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


def _require(cfg: dict[str, Any], key: str, path: Path) -> Any:
    if key not in cfg or cfg[key] is None:
        raise InputError(f"{path}: missing required key {key!r}")
    return cfg[key]


def parse_config(path: Path) -> ModelConfig:
    """Read a LlamaForCausalLM config.json into a :class:`ModelConfig`."""
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{path}: not found (a Hugging Face model folder needs config.json)") from exc
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc
    archs = cfg.get("architectures") or []
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs) and cfg.get("model_type") != "llama":
        raise UnsupportedError(
            f"{path}: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedError(f"{path}: Llama variants with attention or MLP biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    heads = int(_require(cfg, "num_attention_heads", path))
    hidden = int(_require(cfg, "hidden_size", path))
    rope = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    theta = cfg.get("rope_theta", rope.get("rope_theta", 10000.0))
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (int(eos),))
    return ModelConfig(
        vocab_size=int(_require(cfg, "vocab_size", path)),
        hidden_size=hidden,
        intermediate_size=int(_require(cfg, "intermediate_size", path)),
        num_layers=int(_require(cfg, "num_hidden_layers", path)),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        max_position=int(cfg.get("max_position_embeddings", 2048)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=float(theta),
        rope_scaling=_rope_scaling(scaling, path),
        rope_style="half",
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
    )


def _rope_scaling(scaling: dict[str, Any] | None, path: Path) -> RopeScaling | None:
    if not scaling:
        return None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedError(f"{path}: rope_scaling type {kind!r} is not supported (only llama3)")
    return RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position=int(scaling["original_max_position_embeddings"]),
    )


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, json.JSONDecodeError, KeyError) as exc:
            raise InputError(f"{index}: not a valid safetensors index: {exc}") from exc
        files = sorted({folder / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise InputError(f"{index}: shard files missing: {', '.join(missing)}")
        return files
    if single.exists():
        return [single]
    raise InputError(f"{folder}: no model.safetensors or model.safetensors.index.json")


def _read_tensor(path: Path, name: str) -> np.ndarray:
    with safe_open(str(path), framework="np") as f:
        return f.get_tensor(name)


def load_weights(folder: Path, config: ModelConfig) -> WeightStore:
    """Lazily load every Llama tensor under its canonical name."""
    store = WeightStore()
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="np") as f:
                names = list(f.keys())
        except Exception as exc:  # safetensors raises its own error type for bad files
            raise InputError(f"{path}: cannot read safetensors file ({exc}); is it truncated?") from exc
        for hf_name in names:
            name = canonical_name(hf_name)
            if name is None:
                if not _IGNORED.search(hf_name):
                    log.warning("%s: ignoring tensor %s (not a Llama weight)", path, hf_name)
                continue
            store.set_lazy(name, lambda p=path, n=hf_name: _read_tensor(p, n))
    if "lm_head" not in store:
        if not config.tie_word_embeddings:
            raise InputError(f"{folder}: no lm_head.weight and tie_word_embeddings is false")
        if "embed" in store:
            store.set_lazy("lm_head", lambda: store["embed"])
    return store


def load_tokenizer(folder: Path, config: ModelConfig) -> LlmcTokenizer | None:
    """The folder's tokenizer, or None when it has no tokenizer.json (ids-only use)."""
    path = folder / "tokenizer.json"
    if not path.exists():
        return None
    from tokenizers import Tokenizer

    try:
        tokenizer = Tokenizer.from_file(str(path))
    except Exception as exc:
        raise InputError(f"{path}: cannot load tokenizer: {exc}") from exc
    tok_cfg: dict[str, Any] = {}
    cfg_path = folder / "tokenizer_config.json"
    if cfg_path.exists():
        try:
            tok_cfg = json.loads(cfg_path.read_text())
        except json.JSONDecodeError as exc:
            raise InputError(f"{cfg_path}: not valid JSON: {exc}") from exc

    def token_text(value: Any) -> str | None:
        return value.get("content") if isinstance(value, dict) else value

    bos, eos = token_text(tok_cfg.get("bos_token")), token_text(tok_cfg.get("eos_token"))
    eos_ids = list(config.eos_token_ids)
    if eos is not None and tokenizer.token_to_id(eos) is not None and tokenizer.token_to_id(eos) not in eos_ids:
        eos_ids.append(int(tokenizer.token_to_id(eos)))
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    meta = TokenizerMeta(
        bos_token_id=config.bos_token_id,
        eos_token_ids=eos_ids,
        bos_token=bos,
        eos_token=eos,
        chat_template=template,
    )
    return LlmcTokenizer(tokenizer, meta)


def load_hf_folder(folder: Path) -> ModelSource:
    """Load a Hugging Face Llama folder."""
    if not folder.is_dir():
        raise InputError(f"{folder}: not a directory")
    config = parse_config(folder / "config.json")
    weights = load_weights(folder, config)
    files = [folder / "config.json", *_weight_files(folder)]
    files += [folder / n for n in ("tokenizer.json", "tokenizer_config.json") if (folder / n).exists()]
    return ModelSource(
        kind="hf",
        path=folder,
        config=config,
        weights=weights,
        tokenizer=load_tokenizer(folder, config),
        files=files,
    )
