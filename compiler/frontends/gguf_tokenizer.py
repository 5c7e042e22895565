"""A Hugging Face ``tokenizers.Tokenizer`` built from a GGUF file's ``tokenizer.*`` metadata.

Two vocab kinds, as llama.cpp names them in ``tokenizer.ggml.model``:

- ``llama``: SentencePiece BPE (tokens, scores, token types, ``<0xNN>`` byte fallback). It becomes a
  ``tokenizers`` BPE model whose merge ranks follow the piece scores, which is how SentencePiece
  picks merges (the highest-scoring merged piece first), with a Metaspace pre-tokenizer.
- ``gpt2``: byte-level BPE (tokens and merges); the split regex comes from ``tokenizer.ggml.pre``.

Control tokens become special added tokens, user-defined ones plain added tokens;
``add_bos_token``/``add_eos_token`` become a TemplateProcessing post-processor.
"""

from __future__ import annotations

import logging
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from llmc.compiler.config import ModelConfig
from llmc.compiler.errors import InputError, UnsupportedError
from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta

log = logging.getLogger(__name__)

# llama.cpp token types (llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# tokenizer.ggml.pre -> the regexes llama.cpp splits with, in order
PRE_TOKENIZER_SPLITS: dict[str, tuple[str, ...]] = {
    "default": (GPT2_SPLIT,),
    "gpt2": (GPT2_SPLIT,),
    "llama-bpe": (LLAMA3_SPLIT,),
    "llama3": (LLAMA3_SPLIT,),
    "llama-v3": (LLAMA3_SPLIT,),
    "smollm": (r"\p{N}", GPT2_SPLIT),
    "starcoder": (r"\p{N}", GPT2_SPLIT),
    "qwen2": (QWEN2_SPLIT,),
}
# pre-tokenizers whose whole-word vocabulary hits skip the merges (tokenizer.json "ignore_merges")
IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}
# pre-tokenizers for which llama.cpp adds BOS when the file does not say
BOS_BY_DEFAULT = {"llama-bpe", "llama3", "llama-v3"}


def _array(meta: Any, key: str, element: str, required: bool = False) -> list[Any] | None:
    """The array at ``key`` (elements of type ``element``: string, integer or number)."""
    return meta.array(key, element, required=required)


def spm_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a SentencePiece vocab: every split of a normal piece into two
    pieces of the vocab, ranked by the merged piece's score (best first)."""
    ids = {tok: i for i, tok in enumerate(tokens) if types[i] in (NORMAL, USER_DEFINED)}
    ranked: list[tuple[float, int, int, str, str]] = []
    for tok, i in ids.items():
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in ids and right in ids:
                ranked.append((-float(scores[i]), i, cut, left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _spm_model(meta: Any, tokens: list[str], types: list[int]) -> Tokenizer:
    scores = _array(meta, "tokenizer.ggml.scores", "number")
    if scores is None:  # no scores: earlier pieces are the better ones
        scores = [-float(i) for i in range(len(tokens))]
    if len(scores) != len(tokens):
        raise InputError(f"{meta.path}: {len(scores)} token scores for {len(tokens)} tokens")
    unk_id = meta.integer("tokenizer.ggml.unknown_token_id")
    unk = tokens[unk_id] if unk_id is not None and 0 <= unk_id < len(tokens) else None
    vocab = {tok: i for i, tok in enumerate(tokens)}
    model = BPE(vocab=vocab, merges=spm_merges(tokens, scores, types), unk_token=unk,
                fuse_unk=True, byte_fallback=True)
    tokenizer = Tokenizer(model)
    prefix = meta.boolean("tokenizer.ggml.add_space_prefix", True)
    # SentencePiece's dummy prefix is added even when the text starts with a space (Metaspace
    # skips it then), so spaces become U+2581 in a normalizer, as llama.cpp's SPM tokenizer does.
    steps_norm: list[Any] = [normalizers.Replace(" ", "\u2581")]
    if prefix:
        steps_norm.insert(0, normalizers.Prepend("\u2581"))
    tokenizer.normalizer = normalizers.Sequence(steps_norm)
    steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tokenizer.decoder = decoders.Sequence(steps)
    return tokenizer


def _bpe_model(meta: Any, tokens: list[str], pre: str) -> Tokenizer:
    merges_raw = _array(meta, "tokenizer.ggml.merges", "string", required=True) or []
    merges = []
    for m in merges_raw:
        parts = m.split(" ")
        if len(parts) != 2:
            raise InputError(f"{meta.path}: tokenizer merge {m!r} is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    if pre not in PRE_TOKENIZER_SPLITS:
        log.warning("%s: unknown tokenizer.ggml.pre %r; using the gpt2 pre-tokenizer", meta.path, pre)
        pre = "gpt2"
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False,
                              ignore_merges=pre in IGNORE_MERGES))
    splits: list[Any] = [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[pre]]
    splits.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(splits)
    tokenizer.decoder = decoders.ByteLevel()
    return tokenizer


def _post_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    single, pair, special = ["$A"], ["$A", "$B"], []
    if bos is not None:
        single, pair = [bos[0], *single], [bos[0], "$A", bos[0], "$B"]
        special.append(bos)
    if eos is not None:
        single.append(eos[0])
        pair = [*pair[: pair.index("$B")], eos[0], *pair[pair.index("$B"):], eos[0]]
        if eos != bos:
            special.append(eos)
    return processors.TemplateProcessing(single=" ".join(single), pair=" ".join(pair), special_tokens=special)


def build_tokenizer(meta: Any, config: ModelConfig) -> LlmcTokenizer:
    """The :class:`LlmcTokenizer` described by ``tokenizer.*`` metadata (``meta``: gguf.Metadata)."""
    try:
        return _build_tokenizer(meta, config)
    except Exception as exc:
        if type(exc) is not Exception:  # the tokenizers library raises plain Exception for what it cannot build
            raise
        raise InputError(f"{meta.path}: the tokenizer.* metadata does not make a tokenizer: {exc}") from exc


def _build_tokenizer(meta: Any, config: ModelConfig) -> LlmcTokenizer:
    kind = meta.require_string("tokenizer.ggml.model")
    tokens = _array(meta, "tokenizer.ggml.tokens", "string", required=True) or []
    if not tokens:
        raise InputError(f"{meta.path}: tokenizer.ggml.tokens is empty")
    types = _array(meta, "tokenizer.ggml.token_type", "integer") or [NORMAL] * len(tokens)
    if len(types) != len(tokens):
        raise InputError(f"{meta.path}: {len(types)} token types for {len(tokens)} tokens")
    types = [int(t) for t in types]
    pre = meta.string("tokenizer.ggml.pre", "default")
    if kind == "llama":
        tokenizer = _spm_model(meta, tokens, types)
        add_bos_default = True
    elif kind == "gpt2":
        tokenizer = _bpe_model(meta, tokens, pre)
        add_bos_default = pre in BOS_BY_DEFAULT
    else:
        raise UnsupportedError(
            f"{meta.path}: tokenizer.ggml.model {kind!r} is not supported; supported: llama, gpt2"
        )
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t, ty in zip(tokens, types, strict=True)
         if ty in (CONTROL, UNKNOWN)]
    )
    tokenizer.add_tokens(
        [AddedToken(t, special=False, normalized=False) for t, ty in zip(tokens, types, strict=True)
         if ty == USER_DEFINED]
    )

    def special(key: str) -> tuple[str, int] | None:
        value = meta.integer(key)
        if value is None:
            return None
        if not 0 <= value < len(tokens):
            raise InputError(f"{meta.path}: {key} {value} is outside the vocab of {len(tokens)} tokens")
        return tokens[value], value

    bos, eos = special("tokenizer.ggml.bos_token_id"), special("tokenizer.ggml.eos_token_id")
    add_bos = meta.boolean("tokenizer.ggml.add_bos_token", add_bos_default) and bos is not None
    add_eos = meta.boolean("tokenizer.ggml.add_eos_token", False) and eos is not None
    tokenizer.post_processor = _post_processor(bos if add_bos else None, eos if add_eos else None)
    template = meta.string("tokenizer.chat_template")
    tok_meta = TokenizerMeta(
        bos_token_id=config.bos_token_id,
        eos_token_ids=list(config.eos_token_ids),
        bos_token=bos[0] if bos else None,
        eos_token=eos[0] if eos else None,
        chat_template=str(template) if template else None,
    )
    return LlmcTokenizer(tokenizer, tok_meta)
