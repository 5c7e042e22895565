"""A request's output constraint: ``response_format`` (OpenAI) or a ``guided_*`` field (vLLM's
extensions), as an engine :class:`~llmc.runtime.structured.Constraint`.

- ``response_format: {"type": "json_object"}``: any JSON object;
- ``response_format: {"type": "json_schema", "json_schema": {"name", "schema", "strict"}}``: JSON
  valid against the schema (enforced whether ``strict`` is true or not);
- ``guided_json`` (a JSON Schema, as an object or its text), ``guided_regex`` (the whole output
  matches it), ``guided_grammar`` (Lark as llguidance reads it, or llama.cpp's GBNF),
  ``guided_choice`` (exactly one of the strings).

Constraints are compiled off the event loop (:func:`check_constraint`); a bad one is a 400 naming
its field.
"""

from __future__ import annotations

from typing import Any

from llmc.runtime.server.errors import refusal
from llmc.runtime.server.protocol import _GenerationRequest
from llmc.runtime.structured import Constraint, GrammarError

_REGEX_META = set("\\.+*?()|[]{}^$#&-~")


def regex_escape(text: str) -> str:
    """``text`` as a literal in Rust regex syntax (llguidance's regexes)."""
    return "".join("\\" + c if c in _REGEX_META else c for c in text).replace("\n", "\\n").replace("\t", "\\t")


def request_constraint(req: _GenerationRequest) -> Constraint | None:
    """The constraint a request asks for (at most one: the protocol refuses several)."""
    try:
        fmt = req.response_format
        if fmt is not None and fmt.type == "json_object":
            return Constraint.json_object("response_format")
        if fmt is not None and fmt.type == "json_schema":
            assert fmt.json_schema is not None and fmt.json_schema.schema_ is not None
            return Constraint.json_schema(fmt.json_schema.schema_, "response_format")
        if req.guided_json is not None:
            return Constraint.json_schema(req.guided_json, "guided_json")
        if req.guided_regex is not None:
            return Constraint.regex(req.guided_regex, "guided_regex")
        if req.guided_grammar is not None:
            return Constraint.grammar(req.guided_grammar, "guided_grammar")
        if req.guided_choice is not None:
            return Constraint.regex("|".join(f"({regex_escape(c)})" for c in req.guided_choice), "guided_choice")
    except GrammarError as exc:
        raise refusal(exc, "prompt") from exc
    return None


async def check_constraint(model: Any, constraint: Constraint | None) -> None:
    """Compile ``constraint`` where ``model`` (a :class:`~llmc.runtime.server.backend.ServedModel`)
    can, off the event loop; a bad one is a 400 naming its field."""
    if constraint is None:
        return
    try:
        await model.check_constraint(constraint)
    except GrammarError as exc:
        raise refusal(exc, "prompt") from exc

