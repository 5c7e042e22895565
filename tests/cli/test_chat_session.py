"""``ChatSession``: the template, the history within the context, reset."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from llmc import ChatSession, Engine, SamplingParams
from llmc.compiler.errors import RequestError


@pytest.fixture(scope="module")
def engine(chat_model: tuple[Path, Path]) -> Engine:
    _, artifact = chat_model
    with Engine.load(str(artifact), max_running=1) as e:
        yield e


def test_turns_enter_the_history_and_the_next_prompt(engine: Engine) -> None:
    chat = ChatSession(engine, system="be brief", params=SamplingParams(max_tokens=5, temperature=0, ignore_eos=True))
    answer = "".join(chat.send("first question"))
    assert chat.last is not None and len(chat.last.token_ids) == 5
    assert [m["role"] for m in chat.history] == ["user", "assistant"] and chat.history[1]["content"] == answer
    text = engine.tokenizer.decode(chat.prepare("second").prompt_ids, skip_special_tokens=False)
    assert text.index("be brief") < text.index("first question") < text.index(answer) < text.index("second")
    chat.reset()
    text = engine.tokenizer.decode(chat.prepare("second").prompt_ids, skip_special_tokens=False)
    assert "first question" not in text and "be brief" in text


def test_a_stopped_answer_is_not_kept(engine: Engine) -> None:
    chat = ChatSession(engine, params=SamplingParams(max_tokens=200, temperature=0, ignore_eos=True))
    stream = chat.send("hello")
    next(stream)
    stream.close()
    assert chat.history == []
    deadline = time.monotonic() + 10
    while engine.stats()["requests_cancelled"] < 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine.stats()["requests_cancelled"] == 1 and engine.stats()["running"] == 0


def test_oldest_turns_are_dropped_to_fit_the_context(engine: Engine) -> None:
    context = engine.config.max_position
    chat = ChatSession(engine, params=SamplingParams(max_tokens=context // 2, temperature=0))
    filler = "x" * (context // 8)  # byte-level tokenizer: about a token a byte
    for n in range(6):
        chat.history += [{"role": "user", "content": f"q{n} {filler}"}, {"role": "assistant", "content": filler}]
    turn = chat.prepare("now")
    assert turn.dropped > 0 and turn.dropped % 2 == 0
    assert len(turn.prompt_ids) + turn.params.max_tokens <= context
    text = engine.tokenizer.decode(turn.prompt_ids, skip_special_tokens=False)
    assert "q5" in text and "q0" not in text  # the newest stay
    chat.params = SamplingParams(max_tokens=context)  # no history can make room: the answer gets what is left
    chat.reset()
    turn = chat.prepare("now")
    assert turn.dropped == 0 and turn.params.max_tokens == context - len(turn.prompt_ids)
    with pytest.raises(RequestError, match="does not fit the context"):
        chat.prepare("y" * (context + 10))
