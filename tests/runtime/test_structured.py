"""Constrained decoding in the engine: constraints compile or fail clearly, masks reach only the
constrained rows, are computed beside the forward pass, and outputs match their constraint."""

from __future__ import annotations

import json
import re
import threading
from pathlib import Path

import numpy as np
import pytest

from llmc.compiler.tokenizer import LlmcTokenizer, TokenizerMeta
from llmc.runtime import step_loop
from llmc.runtime.engine import Engine, EngineConfig
from llmc.runtime.sampling import RequestSampler, SamplingParams, sample_batch
from llmc.runtime.structured import Constraint, GrammarCompiler, GrammarError, TokenMask, compute_masks
from tests.models import CHATML_TEMPLATE, byte_level_tokenizer
from tests.runtime.fakes import FakeExecutor

VOCAB = 99


@pytest.fixture(scope="module")
def tokenizer() -> LlmcTokenizer:
    meta = TokenizerMeta(bos_token_id=0, eos_token_ids=[2], bos_token="<s>", eos_token="<|im_end|>",
                         chat_template=CHATML_TEMPLATE)
    return LlmcTokenizer(byte_level_tokenizer(VOCAB, printable_only=True), meta)


@pytest.fixture(scope="module")
def compiler(tokenizer: LlmcTokenizer) -> GrammarCompiler:
    return GrammarCompiler(tokenizer, VOCAB, {2})


@pytest.mark.parametrize(("constraint", "message"), [
    (lambda: Constraint.json_schema({"type": "foo"}), "invalid JSON Schema: Invalid type: foo"),
    (lambda: Constraint.json_schema({"type": "string", "format": "nope"}), "Unknown format"),
    (lambda: Constraint.json_schema("{not json"), "not valid JSON"),
    (lambda: Constraint.json_schema([1, 2]), "must be an object"),  # type: ignore[arg-type]
    (lambda: Constraint.regex("(ab"), "unclosed group"),
    (lambda: Constraint.regex(""), "non-empty"),
    (lambda: Constraint.grammar("start: missing_rule"), "unknown name"),
])
def test_bad_constraints_raise_grammar_errors(compiler: GrammarCompiler, constraint, message: str) -> None:
    with pytest.raises(GrammarError, match=re.escape(message)):
        compiler.check(constraint())


def test_mask_allows_exactly_the_next_tokens(compiler: GrammarCompiler, tokenizer: LlmcTokenizer) -> None:
    matcher = compiler.matcher(Constraint.regex("ab[cd]"))
    mask = compute_masks([(0, matcher)], VOCAB)
    allowed = np.flatnonzero(mask.allowed(VOCAB)[0])
    assert [tokenizer.decode([int(t)]) for t in allowed] == ["a"]
    for ch in "ab":
        assert matcher.advance(tokenizer.encode(ch, add_special_tokens=False)[0])
    allowed = np.flatnonzero(compute_masks([(0, matcher)], VOCAB).allowed(VOCAB)[0])
    assert sorted(tokenizer.decode([int(t)]) for t in allowed) == ["c", "d"]
    assert not matcher.advance(tokenizer.encode("x", add_special_tokens=False)[0])  # refused


def test_a_gbnf_grammar_is_accepted(compiler: GrammarCompiler) -> None:
    compiler.check(Constraint.grammar('root ::= "yes" | "no"'))


def test_sample_batch_masks_only_its_rows() -> None:
    logits = np.zeros((3, 8), dtype=np.float32)
    logits[:, 7] = 10.0  # every row prefers token 7
    bits = np.zeros((1, 1), dtype=np.int32)
    bits[0, 0] = (1 << 2) | (1 << 5)  # row 1 may only take 2 or 5
    samplers = [RequestSampler(SamplingParams(temperature=0, logprobs=0), [1], set(), 4) for _ in range(3)]
    tokens, lps = sample_batch(logits, samplers, TokenMask([1], bits))
    assert tokens.tolist()[0] == 7 and tokens.tolist()[2] == 7
    assert tokens[1] in (2, 5)
    assert lps[1] is not None and lps[1].logprob < -9  # logprobs are the model's, not the masked ones


def test_constrained_and_free_requests_share_steps(tokenizer: LlmcTokenizer) -> None:
    executor = FakeExecutor(vocab=VOCAB, max_position=256)
    pattern = r"[a-z]{3}-[0-9]{2,4}"
    with Engine(executor, tokenizer, EngineConfig(max_running=8)) as engine:
        outs = engine.generate(
            ["abc", "hello", "xyz", "hi"],
            [SamplingParams(max_tokens=20, temperature=1.0, seed=i, constraint=Constraint.regex(pattern))
             if i % 2 == 0 else SamplingParams(max_tokens=12, temperature=0, ignore_eos=True) for i in range(4)])
    for i, out in enumerate(outs):
        if i % 2 == 0:
            assert re.fullmatch(pattern, out.text), out.text
            assert out.finish_reason == "stop"
        else:
            assert len(out.token_ids) == 12 and out.finish_reason == "length"
    assert max(len(b.layout.seq_ids) for b in executor.batches) == 4  # constrained rows did not split the batch


def test_masks_are_computed_while_the_forward_pass_runs(tokenizer: LlmcTokenizer,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The step waits inside ``executor.step`` for the mask computation to start: if masks were
    computed after the forward pass (or on the engine thread), the first step would time out."""
    started = threading.Event()
    threads: list[str] = []
    real = step_loop.compute_masks

    def observed(rows, vocab):  # type: ignore[no-untyped-def]
        threads.append(threading.current_thread().name)
        started.set()
        return real(rows, vocab)

    class WaitingExecutor(FakeExecutor):
        def step(self, batch):  # type: ignore[no-untyped-def]
            if batch.logits_rows.size and not started.wait(timeout=10):
                raise AssertionError("the masks were not computed during the forward pass")
            started.clear()
            return super().step(batch)

    monkeypatch.setattr(step_loop, "compute_masks", observed)
    with Engine(WaitingExecutor(vocab=VOCAB), tokenizer) as engine:
        out = engine.generate(["q"], SamplingParams(max_tokens=10, constraint=Constraint.regex("[0-9]{5}")))[0]
    assert re.fullmatch("[0-9]{5}", out.text) and out.finish_reason == "stop"
    assert len(threads) == 5 and set(threads) == {"llmc-masks_0"}


def test_json_schema_on_the_python_api(chat_model: tuple[Path, Path]) -> None:
    jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is in the bench extra")
    schema = {"type": "object", "properties": {
        "name": {"type": "string", "maxLength": 8},
        "n": {"type": "integer", "minimum": -5, "maximum": 500},
        "kind": {"enum": ["a", "b"]}}, "required": ["name", "n", "kind"], "additionalProperties": False}
    with Engine.load(str(chat_model[1]), max_running=16) as engine:
        params = [SamplingParams(max_tokens=80, temperature=1.0, seed=s, constraint=Constraint.json_schema(schema))
                  for s in range(16)]
        outs = engine.generate(["Answer in JSON:"] * 16, params)
    for out in outs:
        jsonschema.validate(json.loads(out.text), schema)
        assert out.finish_reason == "stop"


@pytest.mark.parametrize("overlapped", [False, True])
def test_constrained_and_scored_requests_beside_overlapped_steps(tokenizer: LlmcTokenizer, overlapped: bool) -> None:
    """With an executor whose steps finish after launch, steps holding a constrained or prompt-scored
    request run on the host (the step in flight collected first, no deferred rows); the others still
    overlap. Outputs equal the synchronous executor's."""
    from tests.runtime.fakes import ThreadedFakeExecutor

    pattern = r"[a-z]{2}[0-9]{3}"
    params = [SamplingParams(max_tokens=30, temperature=0, ignore_eos=True),
              SamplingParams(max_tokens=20, temperature=1.0, seed=3, constraint=Constraint.regex(pattern)),
              SamplingParams(max_tokens=6, temperature=0, prompt_logprobs=1, ignore_eos=True),
              SamplingParams(max_tokens=25, temperature=0.7, seed=4, ignore_eos=True)]
    results = []
    for cls in (FakeExecutor, ThreadedFakeExecutor if overlapped else FakeExecutor):
        ex = cls(vocab=VOCAB, max_position=256)
        with Engine(ex, tokenizer, EngineConfig(max_running=8)) as engine:
            results.append(engine.generate(["abc", "hello", "xyz", "hi"], params))
            assert engine.stats()["kv_used_blocks"] == 0
    for a, b in zip(*results, strict=True):
        assert a.token_ids == b.token_ids and a.finish_reason == b.finish_reason
        assert a.prompt_logprobs == b.prompt_logprobs
    assert re.fullmatch(pattern, results[1][1].text)
    if overlapped:
        assert ex.deferred_launches > 0  # the free requests overlapped once the others had finished
        for batch in ex.batches:
            assert not (batch.has_deferred and len(batch.logits_rows) > len(batch.layout.seq_ids))  # scored: host
