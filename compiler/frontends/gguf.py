"""GGUF files (llama.cpp's format, v2/v3): metadata -> config, tensors -> canonical weights.

The file is memory-mapped through ``gguf.GGUFReader``; tensors load lazily. GGUF ``llama``
Q/K weights are stored permuted for adjacent-pair ("interleaved") RoPE, so the config says
``rope_style="interleaved"`` and the weights are kept exactly as stored. Q8_0, Q4_0 and Q4_1
blocks can be kept as :class:`QuantizedTensor` bit for bit (``native_quant=True``); every other
type, and every type when ``native_quant`` is False, is dequantized with ``gguf.quants``.
"""

from __future__ import annotations

import logging
import math
import re
from functools import partial
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
from gguf import GGMLQuantizationType, GGUFReader
from gguf.quants import dequantize as gguf_dequantize

from llmc.compiler.config import ModelConfig, RopeScaling
from llmc.compiler.errors import InputError, UnsupportedError
from llmc.compiler.frontends.source import ModelSource
from llmc.compiler.ir.types import QuantSpec
from llmc.compiler.weights import QuantizedTensor, Weight, WeightStore, pack_codes

log = logging.getLogger(__name__)

SUPPORTED_ARCHITECTURES = ("llama",)
T = GGMLQuantizationType
DEQUANTIZED_TYPES = (T.F32, T.F16, T.BF16, T.Q8_0, T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1,
                     T.Q2_K, T.Q3_K, T.Q4_K, T.Q5_K, T.Q6_K)
NATIVE_TYPES = (T.Q8_0, T.Q4_0, T.Q4_1)

_LAYER_NAMES = {
    "attn_norm": "attn_norm",
    "attn_q": "q",
    "attn_k": "k",
    "attn_v": "v",
    "attn_output": "o",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "gate",
    "ffn_up": "up",
    "ffn_down": "down",
}
_TOP_NAMES = {"token_embd.weight": "embed", "output_norm.weight": "final_norm", "output.weight": "lm_head"}
_LAYER_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.weight$")
ROPE_FREQS = "rope_freqs.weight"


def canonical_name(gguf_name: str) -> str | None:
    """llmc's name for a GGUF ``llama`` tensor, or None if it is not a Llama weight."""
    if gguf_name in _TOP_NAMES:
        return _TOP_NAMES[gguf_name]
    match = _LAYER_RE.match(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        return f"layers.{match.group(1)}.{_LAYER_NAMES[match.group(2)]}"
    return None


class _Reader(GGUFReader):
    """GGUFReader that names the tensor when its ggml type is unknown to the gguf package."""

    def _build_tensors(self, start_offs: int, fields: list[Any]) -> None:
        known = {int(t) for t in GGMLQuantizationType}
        for field in fields:
            raw = int(field.parts[4][0])
            if raw not in known:
                name = bytes(field.parts[1]).decode("utf-8", "replace")
                raise UnsupportedError(
                    f"tensor {name!r} has unknown ggml type {raw}; supported: "
                    + ", ".join(t.name for t in DEQUANTIZED_TYPES)
                )
        super()._build_tensors(start_offs, fields)


def open_gguf(path: Path) -> GGUFReader:
    """Memory-map a GGUF file, turning the reader's failures into :class:`InputError`."""
    try:
        reader = _Reader(path, "r")
    except UnsupportedError as exc:
        raise UnsupportedError(f"{path}: {exc}") from exc
    except (ValueError, KeyError, IndexError, TypeError, OSError, UnicodeDecodeError) as exc:
        text = str(exc).lower()
        if "magic" in text:
            hint = "bad magic: not a GGUF file"
        elif "version" in text:
            hint = "llmc reads GGUF v2 and v3"
        else:
            hint = "truncated or corrupt?"
        raise InputError(f"{path}: cannot read GGUF file: {exc} ({hint})") from exc
    size = path.stat().st_size
    for t in reader.tensors:
        if t.data_offset + t.n_bytes > size:
            raise InputError(f"{path}: tensor {t.name!r} ends past the end of the file (truncated?)")
    return reader


class Metadata:
    """Typed access to a reader's key/value fields, with errors naming the file and key."""

    def __init__(self, reader: GGUFReader, path: Path) -> None:
        self.reader = reader
        self.path = path

    def __contains__(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as exc:
            raise InputError(f"{self.path}: metadata key {key!r} cannot be read: {exc}") from exc

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise InputError(f"{self.path}: missing required metadata key {key!r}")
        return self.get(key)


def parse_config(meta: Metadata, reader: GGUFReader) -> ModelConfig:
    """Model config from ``general.architecture`` and the ``llama.*`` keys."""
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise UnsupportedError(
            f"{meta.path}: architecture {arch!r} is not supported; supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    p = f"{arch}."
    hidden = int(meta.require(p + "embedding_length"))
    heads = int(meta.require(p + "attention.head_count"))
    head_dim = int(meta.get(p + "attention.key_length", hidden // heads))
    tensors = {t.name: t for t in reader.tensors}
    vocab = meta.get(p + "vocab_size")
    if vocab is None:
        tokens = reader.fields.get("tokenizer.ggml.tokens")
        if tokens is not None:
            vocab = len(tokens.data)
        elif "token_embd.weight" in tensors:
            vocab = int(tensors["token_embd.weight"].shape[-1])
        else:
            raise InputError(f"{meta.path}: no {p}vocab_size, tokenizer.ggml.tokens or token_embd.weight")
    eos_ids: list[int] = []
    for key in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id"):
        value = meta.get(key)
        if value is not None and int(value) not in eos_ids:
            eos_ids.append(int(value))
    bos = meta.get("tokenizer.ggml.bos_token_id")
    return ModelConfig(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(meta.require(p + "feed_forward_length")),
        num_layers=int(meta.require(p + "block_count")),
        num_heads=heads,
        num_kv_heads=int(meta.get(p + "attention.head_count_kv", heads)),
        head_dim=head_dim,
        max_position=int(meta.require(p + "context_length")),
        rms_norm_eps=float(meta.require(p + "attention.layer_norm_rms_epsilon")),
        rope_theta=float(meta.get(p + "rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(meta, p, tensors, head_dim),
        rope_style="interleaved",
        rotary_dim=int(meta.get(p + "rope.dimension_count", head_dim)),
        tie_word_embeddings="output.weight" not in tensors,
        bos_token_id=None if bos is None else int(bos),
        eos_token_ids=tuple(eos_ids),
    )


def _rope_scaling(meta: Metadata, p: str, tensors: dict[str, Any], head_dim: int) -> RopeScaling | None:
    kind = meta.get(p + "rope.scaling.type")
    if kind is None and p + "rope.scale_linear" in meta:
        kind = "linear"
    if kind not in (None, "none"):
        factor = meta.get(p + "rope.scaling.factor", meta.get(p + "rope.scale_linear"))
        if kind == "linear" and factor is not None and float(factor) == 1.0:
            kind = "none"
        else:
            raise UnsupportedError(
                f"{meta.path}: RoPE scaling type {kind!r} is not supported (supported: none, and Llama 3 "
                f"frequency factors in {ROPE_FREQS})"
            )
    if ROPE_FREQS not in tensors:
        return None
    # Llama 3.x: llama.cpp stores the llama3 scaling as per-frequency divisors.
    t = tensors[ROPE_FREQS]
    if t.tensor_type != T.F32:
        raise UnsupportedError(f"{meta.path}: {ROPE_FREQS} has type {t.tensor_type.name}, expected F32")
    theta = float(meta.get(p + "rope.freq_base", 10000.0))
    rot = int(meta.get(p + "rope.dimension_count", head_dim))
    return fit_llama3_scaling(np.asarray(t.data, dtype=np.float64).reshape(-1), theta, rot, str(meta.path))


def fit_llama3_scaling(factors: np.ndarray, theta: float, rotary_dim: int, where: str) -> RopeScaling | None:
    """The llama3 scaling that reproduces llama.cpp's ``rope_freqs`` divisors (checked, else an error).

    llama3 divides a frequency by ``factor`` below a band, keeps it above, and in between blends
    with ``smooth = (ctx / wavelen - low) / (high - low)``, a line in ``1 / wavelen``. The line is
    fitted through the in-band divisors (or placed between the bands when fewer than two are in
    band); ``ctx``, ``low`` and ``high`` are then read off the line.
    """
    from llmc.compiler.ir.rope import inv_frequencies

    if factors.shape != (rotary_dim // 2,) or not np.all(np.isfinite(factors)) or np.any(factors <= 0):
        raise UnsupportedError(f"{where}: {ROPE_FREQS} must hold {rotary_dim // 2} positive factors")
    if np.allclose(factors, 1.0, rtol=0, atol=1e-6):
        return None
    factor = float(factors.max())
    inv = 1.0 / theta ** (np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    u = inv / (2 * math.pi)  # 1 / wavelen
    low_band = factors >= factor * (1 - 1e-6)
    high_band = factors <= 1 + 1e-6
    medium = ~(low_band | high_band)
    smooth = (1.0 / factors - 1.0 / factor) / (1.0 - 1.0 / factor)
    u_low = u[low_band].max() if low_band.any() else 0.0
    u_high = u[high_band].min() if high_band.any() else 2 * u.max()
    if medium.sum() >= 2:
        a, c = np.polyfit(u[medium], smooth[medium], 1)
    elif medium.sum() == 1:
        um, sm = float(u[medium][0]), float(smooth[medium][0])
        a = 2 * max(sm / (um - u_low), (1 - sm) / (u_high - um))
        c = sm - a * um
    else:
        a = 2.0 / (u_high - u_low)
        c = -0.5 - a * u_low
    if not (a > 0 and c < 0):
        raise UnsupportedError(f"{where}: {ROPE_FREQS} does not follow Llama 3 RoPE scaling; it is not supported")
    old_ctx = max(1, round(a / -c))  # low == 1 when the line allows an integer context
    span = old_ctx / a
    low = -c * span
    scaling = RopeScaling(factor=factor, low_freq_factor=float(low), high_freq_factor=float(low + span),
                          original_max_position=int(old_ctx))
    attrs = {"rotary_dim": rotary_dim, "theta": theta, "scaling": "llama3", "factor": scaling.factor,
             "low_freq_factor": scaling.low_freq_factor, "high_freq_factor": scaling.high_freq_factor,
             "original_max_position": scaling.original_max_position}
    if not np.allclose(inv / inv_frequencies(attrs), factors, rtol=1e-5, atol=0):
        raise UnsupportedError(f"{where}: {ROPE_FREQS} does not follow Llama 3 RoPE scaling; it is not supported")
    return scaling


def _logical_shape(t: Any) -> tuple[int, ...]:
    return tuple(int(d) for d in reversed(t.shape.tolist()))


def native_quantized(t: Any, path: Path) -> QuantizedTensor:
    """A Q8_0, Q4_0 or Q4_1 tensor as :class:`QuantizedTensor`, bit for bit (no requantization)."""
    shape = _logical_shape(t)
    if len(shape) != 2:
        raise UnsupportedError(f"{path}: tensor {t.name!r} is {len(shape)}-D; native quant blocks need 2-D")
    out, inp = shape
    raw = np.asarray(t.data, dtype=np.uint8)
    qtype = t.tensor_type
    if qtype == T.Q8_0:
        blocks = raw.reshape(out, inp // 32, 34)
        scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(out, -1)
        codes = (blocks[..., 2:] ^ np.uint8(0x80)).reshape(out, inp)  # int8 v -> uint8 v + 128
        return QuantizedTensor(QuantSpec(8, 32, True), shape, np.ascontiguousarray(codes), scales)
    head = 2 if qtype == T.Q4_0 else 4
    blocks = raw.reshape(out, inp // 32, head + 16)
    scales = np.ascontiguousarray(blocks[..., :2]).view(np.float16).reshape(out, -1)
    qs = blocks[..., head:]
    # ggml: element j of a block is the low nibble of byte j, element j + 16 its high nibble
    codes = np.concatenate([qs & np.uint8(0x0F), qs >> np.uint8(4)], axis=-1).reshape(out, inp)
    packed = pack_codes(codes, 4)
    if qtype == T.Q4_0:
        return QuantizedTensor(QuantSpec(4, 32, True), shape, packed, scales)
    offsets = np.ascontiguousarray(blocks[..., 2:4]).view(np.float16).reshape(out, -1)
    return QuantizedTensor(QuantSpec(4, 32, False), shape, packed, scales, offsets)


def read_tensor(t: Any, path: Path, native_quant: bool) -> Weight:
    """One tensor as numpy ``[out, in]`` (or a :class:`QuantizedTensor` for native blocks)."""
    qtype = t.tensor_type
    shape = _logical_shape(t)
    if qtype not in DEQUANTIZED_TYPES:
        raise UnsupportedError(
            f"{path}: tensor {t.name!r} has ggml type {qtype.name}, which llmc does not support; "
            f"supported: {', '.join(x.name for x in DEQUANTIZED_TYPES)}"
        )
    if native_quant and qtype in NATIVE_TYPES:
        return native_quantized(t, path)
    data = np.asarray(t.data)
    if native_quant and qtype == T.F16:
        return data.reshape(shape)
    if native_quant and qtype == T.BF16:
        return data.view(ml_dtypes.bfloat16).reshape(shape)
    if qtype == T.F32:
        return data.reshape(shape)
    return np.asarray(gguf_dequantize(data, qtype), dtype=np.float32).reshape(shape)


def load_weights(reader: GGUFReader, path: Path, native_quant: bool) -> WeightStore:
    """Every Llama tensor under its canonical name, read lazily from the memory map."""
    store = WeightStore()
    for t in reader.tensors:
        name = canonical_name(t.name)
        if name is None:
            if t.name != ROPE_FREQS:
                log.warning("%s: ignoring tensor %s (not a Llama weight)", path, t.name)
            continue
        if t.tensor_type not in DEQUANTIZED_TYPES:  # fail at load time, not at first use
            read_tensor(t, path, native_quant)
        store.set_lazy(name, partial(read_tensor, t, path, native_quant))
    if "lm_head" not in store and "embed" in store:
        store.set_lazy("lm_head", lambda: store["embed"])
    return store


def load_gguf(path: str | Path, native_quant: bool = False) -> ModelSource:
    """Load a GGUF ``llama`` model; ``native_quant`` keeps Q8_0/Q4_0/Q4_1 blocks quantized."""
    from llmc.compiler.frontends.gguf_tokenizer import build_tokenizer

    path = Path(path)
    reader = open_gguf(path)
    meta = Metadata(reader, path)
    config = parse_config(meta, reader)
    weights = load_weights(reader, path, native_quant)
    tokenizer = build_tokenizer(meta, config) if "tokenizer.ggml.model" in meta else None
    name = meta.get("general.name")
    return ModelSource(
        kind="gguf",
        path=path,
        config=config,
        weights=weights,
        tokenizer=tokenizer,
        files=[path],
        meta={"gguf.name": str(name)} if name else {},
    )
