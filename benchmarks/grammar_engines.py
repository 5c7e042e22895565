"""Compare grammar engines for constrained decoding: xgrammar, llguidance and outlines-core.

For each engine and each constraint (a JSON Schema, a regex, a context-free grammar) it
compiles the constraint for the model's vocabulary, then walks a fixed valid output token by
token: before each token it computes the vocabulary mask (what the sampler needs) and then
advances the matcher with the token. It reports the compile time and the per-token mask time
(mean, p50, p99), and a coverage table: which JSON Schema features, regexes and grammars each
engine accepts (compiles, takes a valid instance, refuses an invalid one).

    pip install xgrammar llguidance outlines-core        # each must leave torch as it is
    /work/bin/cpu-exclusive .venv/bin/python benchmarks/grammar_engines.py ART_DIR --json out.json

``ART_DIR`` is an llmc artifact (its ``tokenizer/tokenizer.json`` is used), e.g. SmolLM2-135M
compiled with ``llmc compile SmolLM2-135M-Instruct.Q4_1.gguf -o out/smol --quant native``.
Engines that are not installed are skipped. Results are recorded in docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from llmc.compiler.tokenizer import LlmcTokenizer

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "email": {"type": "string", "format": "email"},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string"}, "maxItems": 5},
        "address": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "address", "active"],
    "additionalProperties": False,
}
SCHEMA_TEXT = ('{"name": "Ada Lovelace", "age": 36, "email": "ada@example.com", "role": "admin", '
               '"tags": ["math", "engines", "poetry"], "address": {"city": "London", "zip": "12345"}, '
               '"active": true}')

JSON_LAYOUT = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
"""Every engine is asked for the same JSON layout: no free whitespace, ``json.dumps``' separators."""

REGEX = r"(Mon|Tue|Wed|Thu|Fri|Sat|Sun) [0-9]{4}-[0-9]{2}-[0-9]{2} [0-2][0-9]:[0-5][0-9] [A-Z][a-z]+( [A-Z][a-z]+)*"
REGEX_TEXT = "Wed 2025-06-18 14:30 Buenos Aires Central"

LARK = r"""
start: expr
expr: term (("+" | "-") term)*
term: factor (("*" | "/") factor)*
factor: NUMBER | "(" expr ")" | "-" factor
NUMBER: /[0-9]+(\.[0-9]+)?/
"""
EBNF = r"""
root ::= expr
expr ::= term (("+" | "-") term)*
term ::= factor (("*" | "/") factor)*
factor ::= number | "(" expr ")" | "-" factor
number ::= [0-9]+ ("." [0-9]+)?
"""
CFG_TEXT = "(12+3.5)*(7-(2/4))-18*(3+(4*5))+((1+2)*(3+4))/9"

# JSON Schema features: (name, schema, a valid instance, an invalid instance)
FEATURES: list[tuple[str, dict[str, Any], Any, Any]] = [
    ("nested objects, required", {"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "integer"}}, "required": ["b"]}}, "required": ["a"]}, {"a": {"b": 1}}, {"a": {}}),
    ("enum", {"enum": ["x", "y"]}, "x", "z"),
    ("const", {"const": 42}, 42, 43),
    ("string min/maxLength", {"type": "string", "minLength": 2, "maxLength": 3}, "ab", "abcd"),
    ("string pattern", {"type": "string", "pattern": "^[a-c]+$"}, "abc", "abd"),
    ("string format date-time", {"type": "string", "format": "date-time"}, "2024-01-02T03:04:05Z", "yesterday"),
    ("string format email", {"type": "string", "format": "email"}, "a@b.io", "not an email"),
    ("string format uuid", {"type": "string", "format": "uuid"}, "123e4567-e89b-12d3-a456-426614174000", "uuid"),
    ("integer minimum/maximum", {"type": "integer", "minimum": 10, "maximum": 20}, 15, 25),
    ("number exclusiveMinimum", {"type": "number", "exclusiveMinimum": 0}, 0.5, -1),
    ("array min/maxItems", {"type": "array", "items": {"type": "integer"}, "minItems": 1, "maxItems": 2}, [1], []),
    ("array prefixItems", {"type": "array", "prefixItems": [{"type": "integer"}, {"type": "string"}],
                           "items": False}, [1, "a"], ["a", 1]),
    ("anyOf", {"anyOf": [{"type": "integer"}, {"type": "string"}]}, "s", True),
    ("oneOf", {"oneOf": [{"type": "integer"}, {"type": "boolean"}]}, True, "s"),
    ("allOf", {"allOf": [{"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
                         {"type": "object", "properties": {"b": {"type": "integer"}}, "required": ["b"]}]},
     {"a": 1, "b": 2}, {"a": 1}),
    ("$ref / $defs (recursive)", {"$defs": {"node": {"type": "object", "properties": {
        "next": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]}}, "required": ["next"],
        "additionalProperties": False}}, "$ref": "#/$defs/node"}, {"next": {"next": None}}, {"next": 1}),
    ("additionalProperties false", {"type": "object", "properties": {"a": {"type": "integer"}},
                                    "additionalProperties": False}, {"a": 1}, {"a": 1, "b": 2}),
    ("additionalProperties schema", {"type": "object", "additionalProperties": {"type": "integer"}},
     {"k": 1}, {"k": "v"}),
    ("type list (nullable)", {"type": ["string", "null"]}, None, 1),
]


def load_tokenizer(artifact: Path) -> LlmcTokenizer:
    return LlmcTokenizer.load(artifact / "tokenizer")


def token_bytes(tok: LlmcTokenizer) -> list[bytes]:
    from llmc.runtime.server.tokens import TokenBytes

    tb = TokenBytes(tok)
    return [tb.bytes_of(i) for i in range(tok.vocab_size)]


class Engine:
    """One grammar engine: compile a constraint to a matcher, fill the next mask, advance by a token."""

    name: str

    def compile(self, kind: str, spec: Any) -> Any: ...
    def mask(self, m: Any) -> None: ...
    def advance(self, m: Any, token: int) -> bool: ...
    def accepts_end(self, m: Any) -> bool: ...


class LLGuidance(Engine):
    name = "llguidance"

    def __init__(self, tok: LlmcTokenizer, eos: int) -> None:
        import llguidance
        import llguidance.numpy as lln

        self.llg, self.lln = llguidance, lln
        self.tok = llguidance.LLTokenizer(tok.tokenizer.to_str(), n_vocab=tok.vocab_size, eos_token=eos)
        self.bitmask = lln.allocate_token_bitmask(1, self.tok.vocab_size)

    def grammar(self, kind: str, spec: Any) -> str:
        M = self.llg.LLMatcher
        if kind == "json":
            return M.grammar_from_json_schema(json.dumps(spec), defaults=JSON_LAYOUT)
        if kind == "regex":
            return M.grammar_from_regex(spec)
        return M.grammar_from_lark(spec)

    def compile(self, kind: str, spec: Any) -> Any:
        m = self.llg.LLMatcher(self.tok, self.grammar(kind, spec), log_level=0)
        if m.is_error():
            raise ValueError(m.get_error())
        return m

    def mask(self, m: Any) -> None:
        self.lln.fill_next_token_bitmask(m, self.bitmask, 0)

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.consume_token(token)) and not m.is_error()

    def accepts_end(self, m: Any) -> bool:
        return bool(m.is_accepting())


class XGrammar(Engine):
    name = "xgrammar"

    def __init__(self, tok: LlmcTokenizer, eos: int) -> None:
        import xgrammar as xgr

        self.xgr = xgr
        self.eos = eos
        vocab = [tok.id_to_token(i) or "" for i in range(tok.vocab_size)]
        info = xgr.TokenizerInfo(vocab, vocab_type=xgr.VocabType.BYTE_LEVEL, vocab_size=tok.vocab_size,
                                 stop_token_ids=[eos], add_prefix_space=False)
        self.compiler = xgr.GrammarCompiler(info, max_threads=1, cache_enabled=False)
        self.bitmask = xgr.allocate_token_bitmask(1, tok.vocab_size)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            compiled = self.compiler.compile_json_schema(json.dumps(spec), any_whitespace=False, strict_mode=True,
                                                          separators=(", ", ": "))
        elif kind == "regex":
            compiled = self.compiler.compile_regex(spec)
        else:
            compiled = self.compiler.compile_grammar(spec)
        return self.xgr.GrammarMatcher(compiled)

    def mask(self, m: Any) -> None:
        m.fill_next_token_bitmask(self.bitmask)

    def advance(self, m: Any, token: int) -> bool:
        return bool(m.accept_token(token))

    def accepts_end(self, m: Any) -> bool:
        return bool(m.accept_token(self.eos)) and bool(m.is_terminated())


class OutlinesCore(Engine):
    name = "outlines-core"

    def __init__(self, tok: LlmcTokenizer, eos: int) -> None:
        import outlines_core as oc

        self.oc = oc
        pieces: dict[bytes, list[int]] = {}
        for i, b in enumerate(token_bytes(tok)):
            if i != eos and b:
                pieces.setdefault(b, []).append(i)
        self.vocab = oc.Vocabulary(eos, pieces)
        self.size = tok.vocab_size
        self.mask_buf = np.zeros((self.size + 31) // 32, dtype=np.int32)

    def compile(self, kind: str, spec: Any) -> Any:
        if kind == "json":
            regex = self.oc.json_schema.build_regex_from_schema(json.dumps(spec), whitespace_pattern=r"[ ]?")
        elif kind == "regex":
            regex = spec
        else:
            raise NotImplementedError("outlines-core has no context-free grammars (only regular languages)")
        return self.oc.Guide(self.oc.Index(regex, self.vocab))

    def mask(self, m: Any) -> None:
        m.write_mask_into(self.mask_buf.ctypes.data, self.mask_buf.size, 4)

    def advance(self, m: Any, token: int) -> bool:
        try:
            m.advance(token)
            return True
        except Exception:
            return False

    def accepts_end(self, m: Any) -> bool:
        return bool(m.is_finished())


def walk(engine: Engine, kind: str, spec: Any, tokens: list[int]) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = engine.compile(kind, spec)
    compile_s = time.perf_counter() - t0
    times = []
    for t in tokens:
        s = time.perf_counter()
        engine.mask(m)
        ok = engine.advance(m, t)
        times.append(time.perf_counter() - s)
        if not ok:
            raise RuntimeError(f"{engine.name} refused token {t} of the valid output for {kind}")
    us = [x * 1e6 for x in times]
    return {"compile_ms": compile_s * 1e3, "tokens": len(tokens), "mask_us_mean": statistics.fmean(us),
            "mask_us_p50": statistics.median(us), "mask_us_p99": float(np.percentile(us, 99))}


def accepts(engine: Engine, kind: str, spec: Any, tokens: list[int]) -> bool:
    m = engine.compile(kind, spec)
    return all(engine.advance(m, t) for t in tokens) and engine.accepts_end(m)


def coverage(engine: Engine, tok: LlmcTokenizer) -> dict[str, str]:
    out = {}
    for name, schema, good, bad in FEATURES:
        try:
            engine.compile("json", schema)
        except Exception as exc:
            out[name] = f"refused: {str(exc).splitlines()[0][:80]}"
            continue
        g = tok.encode(json.dumps(good), add_special_tokens=False)
        b = tok.encode(json.dumps(bad), add_special_tokens=False)
        try:
            good_ok, bad_ok = accepts(engine, "json", schema, g), accepts(engine, "json", schema, b)
        except Exception as exc:
            out[name] = f"error: {str(exc).splitlines()[0][:80]}"
            continue
        out[name] = "yes" if good_ok and not bad_ok else ("loose (accepts invalid)" if bad_ok else "rejects valid")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--repeat", type=int, default=5, help="walks per workload (the best mean is kept)")
    ap.add_argument("--json", type=Path, help="write the results here")
    args = ap.parse_args()
    tok = load_tokenizer(args.artifact)
    eos = tok.meta.eos_token_ids[0]
    workloads = {
        "json_schema": ("json", SCHEMA, SCHEMA_TEXT),
        "regex": ("regex", REGEX, REGEX_TEXT),
        "cfg": ("cfg", None, CFG_TEXT),
    }
    results: dict[str, Any] = {"vocab_size": tok.vocab_size, "engines": {}}
    for cls in (XGrammar, LLGuidance, OutlinesCore):
        try:
            t0 = time.perf_counter()
            engine = cls(tok, eos)
            init_s = time.perf_counter() - t0
        except ImportError as exc:
            print(f"{cls.name}: not installed ({exc})")
            continue
        res: dict[str, Any] = {"tokenizer_init_s": init_s, "workloads": {}}
        for wname, (kind, spec, text) in workloads.items():
            if kind == "cfg":
                spec = EBNF if isinstance(engine, XGrammar) else LARK
            tokens = tok.encode(text, add_special_tokens=False)
            try:
                runs = [walk(engine, kind, spec, tokens) for _ in range(args.repeat)]
                best = min(runs, key=lambda r: r["mask_us_mean"])
                best["compile_ms"] = min(r["compile_ms"] for r in runs)
                res["workloads"][wname] = best
            except NotImplementedError as exc:
                res["workloads"][wname] = {"unsupported": str(exc)}
            except Exception as exc:
                res["workloads"][wname] = {"error": f"{type(exc).__name__}: {exc}"[:200]}
        res["json_schema_coverage"] = coverage(engine, tok)
        results["engines"][cls.name] = res
        print(f"== {cls.name} (tokenizer set-up {init_s:.2f} s)")
        for wname, r in res["workloads"].items():
            if "mask_us_mean" in r:
                print(f"  {wname:12s} compile {r['compile_ms']:8.1f} ms  mask+advance/token mean "
                      f"{r['mask_us_mean']:7.1f} us  p50 {r['mask_us_p50']:7.1f}  p99 {r['mask_us_p99']:7.1f}  "
                      f"({r['tokens']} tokens)")
            else:
                print(f"  {wname:12s} {r}")
        for feat, verdict in res["json_schema_coverage"].items():
            print(f"    {feat:32s} {verdict}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
