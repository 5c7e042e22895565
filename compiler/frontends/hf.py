"""Hugging Face Llama folders: config.json, (sharded) safetensors, tokenizer.json."""

from __future__ import annotations

import json
import logging
import math
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


def _int(cfg: dict[str, Any], key: str, path: Path, default: int | None = None, label: str = "") -> int:
    """``cfg[key]`` as an integer (required when ``default`` is None); wrong types name the key
    (``label`` + key)."""
    value = _require(cfg, key, path) if default is None else cfg.get(key)
    if value is None:
        return int(default)  # type: ignore[arg-type]
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{path}: {label}{key} must be an integer, got {value!r}")
    return value


def _float(cfg: dict[str, Any], key: str, path: Path, default: float, label: str = "") -> float:
    value = cfg.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InputError(f"{path}: {label}{key} must be a number, got {value!r}")
    return float(value)


def _token_ids(value: Any, key: str, path: Path) -> tuple[int, ...]:
    values = value if isinstance(value, list) else ([] if value is None else [value])
    if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in values):
        raise InputError(f"{path}: {key} must be a token id or a list of token ids, got {value!r}")
    return tuple(values)


def parse_config(path: Path) -> ModelConfig:
    """Read a LlamaForCausalLM config.json into a :class:`ModelConfig`."""
    try:
        cfg = json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise InputError(f"{path}: not found (a Hugging Face model folder needs config.json)") from exc
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
        raise InputError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(cfg, dict):
        raise InputError(f"{path}: must hold a JSON object, got {type(cfg).__name__}")
    archs = cfg.get("architectures") or []
    if not isinstance(archs, list):
        archs = [archs]
    if not any(a in SUPPORTED_ARCHITECTURES for a in archs if isinstance(a, str)) and cfg.get("model_type") != "llama":
        raise UnsupportedError(
            f"{path}: architecture {archs or cfg.get('model_type')!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise UnsupportedError(f"{path}: Llama variants with attention or MLP biases are not supported")
    if cfg.get("hidden_act", "silu") != "silu":
        raise UnsupportedError(f"{path}: hidden_act {cfg['hidden_act']!r} is not supported (only silu)")
    heads = _int(cfg, "num_attention_heads", path)
    hidden = _int(cfg, "hidden_size", path)
    if heads <= 0:
        raise InputError(f"{path}: num_attention_heads must be positive, got {heads}")
    rope = cfg.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise InputError(f"{path}: rope_parameters must be an object, got {rope!r}")
    scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type") not in (None, "default") else None)
    theta_cfg = cfg if cfg.get("rope_theta") is not None else rope
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise InputError(f"{path}: tie_word_embeddings must be true or false, got {tie!r}")
    bos = cfg.get("bos_token_id")
    if bos is not None and (isinstance(bos, bool) or not isinstance(bos, int) or bos < 0):
        raise InputError(f"{path}: bos_token_id must be a token id, got {bos!r}")
    try:
        return ModelConfig(
            vocab_size=_int(cfg, "vocab_size", path),
            hidden_size=hidden,
            intermediate_size=_int(cfg, "intermediate_size", path),
            num_layers=_int(cfg, "num_hidden_layers", path),
            num_heads=heads,
            num_kv_heads=_int(cfg, "num_key_value_heads", path, heads) or heads,
            head_dim=_int(cfg, "head_dim", path, hidden // heads) or hidden // heads,
            max_position=_int(cfg, "max_position_embeddings", path, 2048),
            rms_norm_eps=_float(cfg, "rms_norm_eps", path, 1e-6),
            rope_theta=_float(theta_cfg, "rope_theta", path, 10000.0),
            rope_scaling=_rope_scaling(scaling, path),
            rope_style="half",
            tie_word_embeddings=tie,
            bos_token_id=bos,
            eos_token_ids=_token_ids(cfg.get("eos_token_id"), "eos_token_id", path),
        )
    except InputError as exc:
        if str(exc).startswith(str(path)):
            raise
        raise InputError(f"{path}: {exc}") from exc


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _rope_scaling(scaling: Any, path: Path) -> RopeScaling | None:
    if not scaling:
        return None
    if not isinstance(scaling, dict):
        raise InputError(f"{path}: rope_scaling must be an object with rope_type and its parameters, got {scaling!r}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None
    if kind != "llama3":
        raise UnsupportedError(f"{path}: rope_scaling type {kind!r} is not supported (only llama3)")
    missing = [k for k in ROPE_SCALING_KEYS if scaling.get(k) is None]
    if missing:
        raise InputError(f"{path}: llama3 rope_scaling lacks {', '.join(missing)}")
    values = {k: _float(scaling, k, path, 0.0, "rope_scaling.") for k in ROPE_SCALING_KEYS[:3]}
    return RopeScaling(
        factor=values["factor"],
        low_freq_factor=values["low_freq_factor"],
        high_freq_factor=values["high_freq_factor"],
        original_max_position=_int(scaling, "original_max_position_embeddings", path, label="rope_scaling."),
    )


SAFETENSORS_DTYPES = ("F32", "F16", "BF16")
"""Safetensors dtypes of the weights llmc reads (others, e.g. BOOL, U16, F8_E4M3, are refused by name)."""


def _weight_files(folder: Path) -> list[Path]:
    index = folder / "model.safetensors.index.json"
    single = folder / "model.safetensors"
    if index.exists():
        try:
            data = json.loads(index.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"{index}: not a valid safetensors index: {exc}") from exc
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise InputError(f"{index}: not a valid safetensors index: weight_map must map tensor names to file names")
        root = folder.resolve()
        files = sorted({folder / f for f in weight_map.values()})
        outside = [str(f) for f in files if root not in f.resolve().parents]
        if outside:
            raise InputError(f"{index}: shard files must lie in the model folder, not {', '.join(outside)}")
        missing = [str(f) for f in files if not f.is_file()]
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
    """Lazily load every Llama tensor under its canonical name (dtypes checked here, data read on use)."""
    store = WeightStore()
    for path in _weight_files(folder):
        try:
            with safe_open(str(path), framework="np") as f:
                dtypes = {name: f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118
        except Exception as exc:  # safetensors raises its own error type for bad files
            raise InputError(f"{path}: cannot read safetensors file ({exc}); is it truncated?") from exc
        for hf_name, dtype in dtypes.items():
            name = canonical_name(hf_name)
            if name is None:
                if not _IGNORED.search(hf_name):
                    log.warning("%s: ignoring tensor %s (not a Llama weight)", path, hf_name)
                continue
            if dtype not in SAFETENSORS_DTYPES:
                raise UnsupportedError(f"{path}: tensor {hf_name!r} has dtype {dtype}; supported: "
                                       f"{', '.join(SAFETENSORS_DTYPES)}")
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
        except (OSError, UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise InputError(f"{cfg_path}: not valid JSON: {exc}") from exc
        if not isinstance(tok_cfg, dict):
            raise InputError(f"{cfg_path}: must hold a JSON object, got {type(tok_cfg).__name__}")

    def token_text(key: str) -> str | None:
        value = tok_cfg.get(key)
        value = value.get("content") if isinstance(value, dict) else value
        if value is not None and not isinstance(value, str):
            raise InputError(f"{cfg_path}: {key} must be a token's text, got {value!r}")
        return value

    bos, eos = token_text("bos_token"), token_text("eos_token")
    eos_ids = list(config.eos_token_ids)
    if eos is not None and tokenizer.token_to_id(eos) is not None and tokenizer.token_to_id(eos) not in eos_ids:
        eos_ids.append(int(tokenizer.token_to_id(eos)))
    template = tok_cfg.get("chat_template")
    if isinstance(template, list):  # named templates: take the default one
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"),
                        None)
    if template is not None and not isinstance(template, str):
        raise InputError(f"{cfg_path}: chat_template must be a string (or a list of named templates), "
                         f"got {type(template).__name__}")
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
