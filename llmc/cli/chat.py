"""``llmc chat``: a conversation in the terminal, or one answer per line of a script's stdin."""

from __future__ import annotations

import contextlib
import copy
import sys
from pathlib import Path
from typing import Any

import click

from llmc.cli.common import MODEL_HELP, resolve_model
from llmc.cli.run import run as run_cmd

SHARED_OPTIONS = ("max_tokens", "temperature", "top_k", "top_p", "seed", "stop", "ignore_eos", "device", "threads",
                  "compile_target", "quant")
"""``llmc run``'s options that ``llmc chat`` takes too (the same option objects, so they stay alike)."""

CHAT_MAX_TOKENS = 512

COMMANDS = "/reset forgets the conversation, /exit (or Ctrl-D) leaves, Ctrl-C stops an answer"


def _shared_options() -> list[click.Parameter]:
    options = []
    for param in run_cmd.params:
        if param.name in SHARED_OPTIONS:
            param = copy.copy(param)
            if param.name == "max_tokens":
                param.default = CHAT_MAX_TOKENS
                param.help = "Most tokens per answer (less when the context is nearly full)."
            options.append(param)
    return options


def _note(text: str) -> None:
    click.echo(f"({text})", err=True)


def _read_line(interactive: bool) -> str | None:
    """The next message, or None at the end of input."""
    if not interactive:
        line = sys.stdin.readline()
        return None if not line else line.rstrip("\n")
    while True:
        try:
            return input(">>> ")
        except EOFError:
            click.echo()
            return None
        except KeyboardInterrupt:  # at the prompt: a fresh line, not an exit
            click.echo()
            _note("/exit or Ctrl-D leaves")


def _answer(session: Any, text: str) -> None:
    """Stream one answer to stdout; Ctrl-C stops it (and it is not kept in the history)."""
    from llmc.compiler.errors import RequestError

    try:
        turn = session.prepare(text)
    except RequestError as exc:
        _note(str(exc))
        return
    if turn.dropped:
        _note(f"dropped the oldest {turn.dropped} messages to fit the context of {session.context} tokens")
    stream = session.send(text, turn)
    try:
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        click.echo()
        _note("stopped; this answer is not kept")
        return
    click.echo()
    if session.last is not None and session.last.finish_reason == "length":
        _note(f"the answer reached --max-tokens {turn.params.max_tokens}")


@click.command(name="chat")
@click.argument("artifact", metavar="MODEL", type=click.Path(path_type=Path))
@click.option("--system", default=None, help="System prompt (instructions placed before the conversation).")
def chat(artifact: Path, system: str | None, **options: Any) -> None:
    """Chat with MODEL using its chat template, streaming each answer as it is generated.

    On a terminal: type a message, get the answer; /reset forgets the conversation, /exit or Ctrl-D
    leaves, Ctrl-C stops the current answer. Otherwise each line of stdin is one message and the
    answers are printed one after another:

    \b
        printf 'Name the capital of France.\\n' | llmc chat model.gguf --max-tokens 24 --temperature 0

    The conversation is kept within the model's context: when it would not fit, the oldest turns
    are left out (with a note). MODEL_HELP
    """
    from llmc.chat import ChatSession
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    params = SamplingParams(max_tokens=options["max_tokens"], temperature=options["temperature"],
                            top_k=options["top_k"], top_p=options["top_p"], seed=options["seed"],
                            stop=list(options["stop"]), ignore_eos=options["ignore_eos"])
    path = resolve_model(artifact, options["compile_target"], options["quant"], options["device"])
    interactive = sys.stdin.isatty()
    with Engine.load(str(path), device=options["device"], threads=options["threads"], max_running=1) as engine:
        session = ChatSession(engine, system=system, params=params)
        if interactive:
            _note(f"chatting with {artifact.name} (context {session.context} tokens); {COMMANDS}")
            with contextlib.suppress(ImportError):
                import readline  # noqa: F401  (line editing and history for input())
        while (line := _read_line(interactive)) is not None:
            text = line.strip()
            if not text:
                continue
            if text in ("/exit", "/quit", "/bye"):
                break
            if text == "/reset":
                session.reset()
                _note("conversation cleared")
                continue
            if text.startswith("/") and " " not in text:
                _note(f"unknown command {text}; {COMMANDS}")
                continue
            _answer(session, text)


chat.help = (chat.help or "").replace("MODEL_HELP", MODEL_HELP)
chat.params.extend(_shared_options())
