"""A byte-level BPE tokenizer of any vocab size, for synthetic models.

The 256 byte tokens plus merges learned (with the ``tokenizers`` trainer) from a small built-in
English text; unreachable ``<|synth_pad_N|>`` tokens fill the rest up to the model's vocab size,
and the preset's special tokens sit at their real ids. The same vocab is written as a
``tokenizer.json`` and as GGUF ``tokenizer.ggml.*`` metadata, so both formats tokenize alike.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from llmc.compiler.errors import InputError
from llmc.compiler.frontends.gguf_tokenizer import CONTROL, IGNORE_MERGES, NORMAL, PRE_TOKENIZER_SPLITS
from llmc.compiler.tokenizer import byte_level_alphabet
from llmc.synth.presets import Preset

MAX_MERGES = 2000

CORPUS = """\
Once upon a time, in a small town by the sea, there lived a baker who woke before the sun every day.
She made bread, rolls and little cakes, and the whole street smelled of butter and warm sugar.
The children of the town would stop at her window on their way to school and ask what she had made.
"Today it is apple pie," she would say, "and tomorrow, if the weather is kind, it will be cherry."
A compiler turns a program written by people into instructions a machine can run quickly.
It reads the source, builds an intermediate representation, rewrites it with optimization passes,
and finally emits code for a target such as a CPU or a GPU. Good compilers check their work:
every pass must keep the meaning of the program while it makes the program faster or smaller.
Language models predict the next token of a text from the tokens before it. They are large, and
running them fast means reading their weights from memory as few times as possible per token.
Batching many requests together lets one pass over the weights serve many users at once.
The numbers 0 1 2 3 4 5 6 7 8 9 10 100 1000 2024 3.14 42 and 1,000,000 appear in many texts.
Questions? Answers! Lists: apples, pears, plums; symbols like (x + y) * z = 7 and a_b-c/d.
In the morning the fishermen came back with their boats full, and the market was loud and busy.
The old lighthouse keeper told stories about storms, ships and the stars that guide sailors home.
"""


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from bytes to printable characters (the byte-level BPE alphabet); a copy."""
    return dict(byte_level_alphabet())


def _pre_tokenizer(style: str) -> pre_tokenizers.PreTokenizer:
    if style not in PRE_TOKENIZER_SPLITS:
        raise InputError(f"unknown pre-tokenizer {style!r}; choose from {', '.join(PRE_TOKENIZER_SPLITS)}")
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(r), behavior="isolated") for r in PRE_TOKENIZER_SPLITS[style]
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


@lru_cache(maxsize=8)
def _learned_merges(style: str, count: int) -> tuple[tuple[str, str], ...]:
    """Up to ``count`` merges learned from :data:`CORPUS` (deterministic)."""
    if count <= 0:
        return ()
    alphabet = list(bytes_to_unicode().values())
    tok = Tokenizer(BPE())
    tok.pre_tokenizer = _pre_tokenizer(style)
    trainer = trainers.BpeTrainer(vocab_size=256 + count, initial_alphabet=alphabet, show_progress=False,
                                  min_frequency=2)
    tok.train_from_iterator([CORPUS], trainer=trainer)
    merges = json.loads(tok.to_str())["model"]["merges"]
    pairs = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in merges]
    return tuple((a, b) for a, b in pairs[:count])


@dataclass(frozen=True)
class SynthVocab:
    """Tokens in id order, their llama.cpp types, the merges and the preset's layout."""

    tokens: list[str]
    types: list[int]
    merges: list[tuple[str, str]]
    preset: Preset

    def tokenizer(self) -> Tokenizer:
        """The Hugging Face ``tokenizers`` object for this vocab."""
        vocab = {t: i for i, t in enumerate(self.tokens)}
        tok = Tokenizer(BPE(vocab=vocab, merges=self.merges, fuse_unk=False, byte_fallback=False,
                            ignore_merges=self.preset.pre_tokenizer in IGNORE_MERGES))
        tok.pre_tokenizer = _pre_tokenizer(self.preset.pre_tokenizer)
        tok.decoder = decoders.ByteLevel()
        tok.add_special_tokens([AddedToken(self.tokens[i], special=True, normalized=False)
                                for i in sorted(self.preset.specials)])
        if self.preset.add_bos:
            bos = (self.tokens[self.preset.bos_token_id], self.preset.bos_token_id)
            tok.post_processor = processors.TemplateProcessing(
                single=f"{bos[0]} $A", pair=f"{bos[0]} $A {bos[0]} $B", special_tokens=[bos])
        return tok

    def tokenizer_config(self) -> dict[str, object]:
        """``tokenizer_config.json`` so that ``AutoTokenizer`` loads the folder."""
        p = self.preset
        return {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": self.tokens[p.bos_token_id],
            "eos_token": self.tokens[p.eos_token_id],
            "model_max_length": int(p.hf_config["max_position_embeddings"]),
            "clean_up_tokenization_spaces": False,
            "chat_template": p.chat_template,
        }


def build_vocab(preset: Preset) -> SynthVocab:
    """The vocab of ``preset``: specials at their ids, bytes and merges, then padding tokens."""
    size = preset.vocab_size
    bad = [i for i in preset.specials if not 0 <= i < size]
    if bad:
        raise InputError(f"preset {preset.name}: special token ids {bad[:3]} are outside the vocab of {size}")
    free = [i for i in range(size) if i not in preset.specials]
    if len(free) < 256:
        raise InputError(f"preset {preset.name}: a byte-level vocab needs 256 free ids, only {len(free)} left")
    byte_tokens = list(bytes_to_unicode().values())
    merges = list(_learned_merges(preset.pre_tokenizer, min(MAX_MERGES, len(free) - 256)))
    normal: list[str] = list(byte_tokens)
    seen = set(normal)
    kept: list[tuple[str, str]] = []
    for a, b in merges:
        if a + b not in seen:
            seen.add(a + b)
            normal.append(a + b)
            kept.append((a, b))
    pad = 0
    while len(normal) < len(free):
        normal.append(f"<|synth_pad_{pad}|>")
        pad += 1
    tokens = [""] * size
    types = [NORMAL] * size
    for i, text in preset.specials.items():
        tokens[i] = text
        types[i] = CONTROL
    for i, text in zip(free, normal, strict=True):
        tokens[i] = text
    return SynthVocab(tokens, types, kept, preset)
