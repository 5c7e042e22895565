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
