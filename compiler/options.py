"""Reading ``KEY=VALUE`` option values typed in by users (pipeline pass arguments, target options)."""

from __future__ import annotations

from typing import Any


def parse_value(text: str) -> Any:
    """``true``/``false`` as bool, then int, then float; anything else stays a (stripped) string."""
    text = text.strip()
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


_SIZE_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
               "t": 1000**4, "tb": 1000**4, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def parse_bytes(text: str | int, what: str = "size") -> int:
    """A byte count from ``8GiB``, ``512MiB``, ``2.5GB``, ``4e9`` or a plain integer (``what`` names the
    option in the error)."""
    from llmc.compiler.errors import InputError

    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        raw = str(text).strip().replace(" ", "").replace("_", "")
        i = len(raw)
        while i and raw[i - 1].isalpha():
            i -= 1
        number, unit = raw[:i], raw[i:].lower()
        try:
            value = float(number)
        except ValueError:
            value = float("nan")
        if unit not in _SIZE_UNITS or not value == value:
            raise InputError(f"{what} must be a size such as 8GiB, 512MiB or a number of bytes, got {text!r}")
    size = int(value * _SIZE_UNITS[unit])
    if size < 1:
        raise InputError(f"{what} must be positive, got {text!r}")
    return size
