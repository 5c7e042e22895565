"""One tokenizer interface over ``tokenizer.json`` or GGUF metadata.

Wraps a Hugging Face ``tokenizers.Tokenizer`` plus what it does not carry: BOS/EOS ids and the
chat template (rendered with jinja2 the way Hugging Face renders it).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from llmc.compiler.errors import InputError, LlmcError
from llmc.compiler.text import check_unicode


@lru_cache(maxsize=1)
def byte_level_alphabet() -> dict[int, str]:
    """GPT-2's map from each byte to the printable character byte-level BPE spells it with (the
    ``ByteLevel`` pre-tokenizer's table): printable Latin-1 bytes stand for themselves, the others
    for 256, 257, ... in byte order. Cached: do not mutate the result."""
    printable = {*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)}
    mapping: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping

TOKENIZER_FILE = "tokenizer.json"
META_FILE = "llmc_tokenizer.json"


@dataclass
class TokenizerMeta:
    """What llmc keeps beside ``tokenizer.json``."""

    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    bos_token: str | None = None
    eos_token: str | None = None
    chat_template: str | None = None


class LlmcTokenizer:
    """Encode, decode and chat-format text for one model."""

    def __init__(self, tokenizer: Tokenizer, meta: TokenizerMeta) -> None:
        self.tokenizer = tokenizer
        self.meta = meta

    @property
    def vocab_size(self) -> int:
        return int(self.tokenizer.get_vocab_size(with_added_tokens=True))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; a :class:`RequestError` when it is not valid Unicode (a lone surrogate)."""
        check_unicode(text, "the text")
        return list(self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids)

    def encode_batch(self, texts: list[str], add_special_tokens: bool = True) -> list[list[int]]:
        for i, text in enumerate(texts):
            check_unicode(text, f"text {i}" if len(texts) > 1 else "the text")
        encoded = self.tokenizer.encode_batch(texts, add_special_tokens=add_special_tokens)
        return [list(e.ids) for e in encoded]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return str(self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens))

    def id_to_token(self, token_id: int) -> str | None:
        return self.tokenizer.id_to_token(int(token_id))

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None) -> str:
        """Render ``messages`` with the model's chat template (jinja2, as Hugging Face does);
        ``tools`` (OpenAI-style function definitions) go to templates that render them."""
        if not self.meta.chat_template:
            raise LlmcError("this model has no chat template; use a plain prompt instead")
        from jinja2 import TemplateError
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        def raise_exception(message: str) -> None:
            raise LlmcError(f"chat template error: {message}")

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        env.filters["tojson"] = lambda v, indent=None: json.dumps(v, ensure_ascii=False, indent=indent)
        try:
            template = env.from_string(self.meta.chat_template)
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                tools=tools,
                bos_token=self.meta.bos_token or "",
                eos_token=self.meta.eos_token or "",
            )
        except TemplateError as exc:
            raise LlmcError(f"chat template failed to render: {exc}") from exc

    @property
    def has_chat_template(self) -> bool:
        return bool(self.meta.chat_template)

    @property
    def template_renders_tools(self) -> bool:
        """Whether the chat template renders ``tools`` itself (Llama 3.x, Qwen/Hermes templates do)."""
        return "tools" in (self.meta.chat_template or "")

    def encode_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                    tools: list[dict[str, Any]] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template (which places any BOS itself)."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools), add_special_tokens=False)

    def save(self, directory: Path) -> list[str]:
        """Write ``tokenizer.json`` and the llmc metadata; returns the file names."""
        directory.mkdir(parents=True, exist_ok=True)
        self.tokenizer.save(str(directory / TOKENIZER_FILE))
        (directory / META_FILE).write_text(json.dumps(asdict(self.meta), indent=1))
        return [TOKENIZER_FILE, META_FILE]

    @classmethod
    def load(cls, directory: Path) -> LlmcTokenizer:
        try:
            tokenizer = Tokenizer.from_file(str(directory / TOKENIZER_FILE))
            meta = TokenizerMeta(**json.loads((directory / META_FILE).read_text()))
        except (OSError, ValueError, TypeError, Exception) as exc:
            raise InputError(f"cannot load tokenizer from {directory}: {exc}") from exc
        return cls(tokenizer, meta)
