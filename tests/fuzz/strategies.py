"""Hypothesis strategies shared by the fuzz tests: the values that break parsers."""

from __future__ import annotations

from typing import Any

from hypothesis import strategies as st

EDGE_INTS = [0, 1, 2, 3, -1, -2**31, 2**31 - 1, 2**32 - 1, 2**32, 2**40, 2**62, 2**63 - 1, 2**64 - 1]
EDGE_FLOATS = [0.0, -0.0, -1.0, 1e-30, 1e30, float("nan"), float("inf"), float("-inf"), 0.5, 3.0]
EDGE_STRINGS = ["", "a", "abc", "llama", "linear", "llama3", "\u00e9\u4e2d", "x" * 300, "\udcff"]

edge_ints = st.sampled_from(EDGE_INTS) | st.integers(-5, 5000)
edge_floats = st.sampled_from(EDGE_FLOATS) | st.floats(allow_nan=True, allow_infinity=True, width=32)
edge_strings = st.sampled_from(EDGE_STRINGS) | st.text(max_size=20)


def json_values(depth: int = 2) -> st.SearchStrategy[Any]:
    """Any JSON value, biased to the edges (NaN included: Python's json reads it)."""
    scalars = st.none() | st.booleans() | edge_ints | edge_floats | edge_strings.filter(lambda s: "\udcff" not in s)
    if depth == 0:
        return scalars
    inner = json_values(depth - 1)
    return scalars | st.lists(inner, max_size=3) | st.dictionaries(edge_strings.filter(lambda s: "\udcff" not in s),
                                                                    inner, max_size=3)


def mutate_json(draw: st.DrawFn, value: Any, depth: int = 0, path: list[str] | None = None) -> Any:
    """``value`` with one spot changed: a value replaced, a key dropped, or an item dropped. ``path``
    (when given) receives a description of the spot, e.g. ``['target', 'options', 'block_size=None']``."""
    path = path if path is not None else []
    if isinstance(value, dict) and value and draw(st.integers(0, 3)) and depth < 6:
        key = draw(st.sampled_from(sorted(value, key=str)))
        action = draw(st.sampled_from(["descend", "descend", "replace", "drop"]))
        out = dict(value)
        if action == "drop":
            del out[key]
            path.append(f"drop {key}")
        elif action == "replace":
            out[key] = draw(json_values())
            path.append(f"{key}={str(out[key])[:80]}")
        else:
            path.append(str(key))
            out[key] = mutate_json(draw, value[key], depth + 1, path)
        return out
    if isinstance(value, list) and value and draw(st.integers(0, 3)) and depth < 6:
        i = draw(st.integers(0, len(value) - 1))
        out_list = list(value)
        if draw(st.booleans()):
            path.append(f"[{i}]")
            out_list[i] = mutate_json(draw, value[i], depth + 1, path)
        else:
            del out_list[i]
            path.append(f"drop [{i}]")
        return out_list
    replacement = draw(json_values())
    path.append(f"= {str(replacement)[:80]}")
    return replacement
