"""Text that is not valid Unicode: Python strings may hold lone surrogates (U+D800-U+DFFF), from
JSON escapes such as ``"\\ud800"``, from command-line arguments and files holding bytes that are not
UTF-8 (decoded with ``surrogateescape``); no tokenizer or UTF-8 encoder accepts them."""

from __future__ import annotations

import re

from llmc.compiler.errors import RequestError

_SURROGATE = re.compile("[\ud800-\udfff]")


def first_surrogate(text: str) -> int | None:
    """The index of the first lone surrogate in ``text``, or None (O(1) for ASCII text)."""
    if text.isascii():
        return None
    match = _SURROGATE.search(text)
    return None if match is None else match.start()


def not_unicode_message(text: str, index: int, what: str) -> str:
    """One line saying that ``what`` holds a lone surrogate at ``index``."""
    code = ord(text[index])
    message = f"{what} is not valid Unicode: it holds a lone surrogate, U+{code:04X}, at character {index}"
    if 0xDC80 <= code <= 0xDCFF:  # how Python decodes a byte that is not UTF-8 (surrogateescape)
        message += f" (the byte 0x{code - 0xDC00:02X}, if it was read from bytes that are not UTF-8)"
    return message


def check_unicode(text: str, what: str) -> None:
    """Raise a :class:`RequestError` naming ``what`` when ``text`` is not valid Unicode."""
    index = first_surrogate(text)
    if index is not None:
        raise RequestError(not_unicode_message(text, index, what))
