"""Run fuzz cases in a worker process under an address-space limit and a per-case time limit.

The worker (``python -m tests.fuzz.sandbox``) imports llmc once and then runs one case per line
of JSON on stdin: ``{"op": ..., "args": {...}}``. It answers one line: ``ok``, ``error`` (an
:class:`~llmc.errors.LlmcError`, with its message), or ``crash`` (any other exception, with the
traceback; a MemoryError means the case tried to allocate without bound). The parent
(:class:`Sandbox`) kills and restarts a worker that does not answer within the time limit
(``hang``) or dies (``died``), and checks that nothing outside the case's output folder changed.
"""

from __future__ import annotations

import json
import os
import resource
import select
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ADDRESS_SPACE_BYTES = 6 << 30
"""The worker's RLIMIT_AS: torch and llmc's imports map about 0.7 GiB; a case may use a few GiB of
address space (thread stacks and allocator arenas count), far less than an unbounded read would."""
CASE_SECONDS = 30.0
"""Per-case limit (the slowest legitimate case, a compile and one generated token of a tiny model on a
loaded 2-core machine, takes well under 5 s)."""


@dataclass
class Outcome:
    status: str
    """ok, error (an LlmcError), crash (another exception), hang or died."""
    detail: str = ""
    error_type: str = ""

    @property
    def clean(self) -> bool:
        return self.status in ("ok", "error")


def _snapshot(root: Path, skip: Path | None) -> dict[str, tuple[int, int]]:
    """Every path under ``root`` (except inside ``skip``) with its size and mtime."""
    found: dict[str, tuple[int, int]] = {}
    for path in root.rglob("*"):
        if skip is not None and (path == skip or skip in path.parents):
            continue
        stat = path.lstat()
        found[str(path.relative_to(root))] = (stat.st_size if not path.is_dir() else 0, stat.st_mtime_ns)
    return found


class Sandbox:
    """A worker process and the checks around each case."""

    def __init__(self, address_space: int = ADDRESS_SPACE_BYTES, seconds: float = CASE_SECONDS) -> None:
        self.address_space = address_space
        self.seconds = seconds
        self.proc: subprocess.Popen[str] | None = None

    def _start(self) -> subprocess.Popen[str]:
        limit = self.address_space

        def limit_memory() -> None:
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        root = Path(__file__).resolve().parents[2]
        return subprocess.Popen([sys.executable, "-m", "tests.fuzz.sandbox"], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, cwd=root, env=env,
                                preexec_fn=limit_memory)

    def close(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, op: str, workdir: Path, output: Path | None = None, **args: Any) -> Outcome:
        """Run ``op`` in the worker; ``workdir`` must not change except inside ``output``."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        before = _snapshot(workdir, output)
        proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        proc.stdin.flush()
        ready, _, _ = select.select([proc.stdout], [], [], self.seconds)
        if not ready:
            self.close()
            return Outcome("hang", f"{op} {args}: no answer within {self.seconds} s")
        line = proc.stdout.readline()
        if not line:
            code = proc.wait()
            self.proc = None
            return Outcome("died", f"{op} {args}: the worker exited with {code}")
        answer = json.loads(line)
        outcome = Outcome(answer["status"], answer.get("detail", ""), answer.get("type", ""))
        after = _snapshot(workdir, output)
        changed = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
        if changed:
            return Outcome("touched", f"{op} changed paths outside its output: {changed[:5]}")
        return outcome


# -- the worker -----------------------------------------------------------------------------------

def _op_load_source(path: str) -> None:
    from llmc.compiler.frontends.source import load_source

    source = load_source(path)
    for name in list(source.weights)[:3]:
        _ = source.weights[name]  # lazy loads run the tensor readers
    if source.tokenizer is not None:
        source.tokenizer.encode("Hello, world")


def _op_compile(source: str, out: str, native: bool = False) -> None:
    from llmc.driver import CompileOptions, compile_model
    from llmc.runtime.generate import generate_ids
    from llmc.runtime.loader import load_model
    from llmc.runtime.sampling import SamplingParams

    path = compile_model(source, out, CompileOptions(opt_level=0, quant="native" if native else "none"))
    model = load_model(path)
    generate_ids(model, [0], SamplingParams(max_tokens=1, temperature=0))
    if model.tokenizer is not None:
        ids = model.tokenizer.encode("Hello, world! 123")
        model.tokenizer.decode(ids)


def _op_load_artifact(path: str) -> None:
    from llmc.runtime.engine import Engine
    from llmc.runtime.sampling import SamplingParams

    with Engine.load(path, max_running=2, max_num_tokens=64) as engine:
        engine.generate([[0, 1]], SamplingParams(max_tokens=1, temperature=0))
        if engine.tokenizer is not None:
            engine.generate(["hi"], SamplingParams(max_tokens=1, temperature=0))


def _op_inspect(path: str) -> None:
    from llmc.runtime.inspect import summarize

    summarize(Path(path))


def _op_cli(args: list[str]) -> None:
    """Run the CLI in-process: exit 0 is ok, exit 2 with one ``error:`` line is an LlmcError."""
    from click.testing import CliRunner

    from llmc.cli import main
    from llmc.compiler.errors import LlmcError

    result = CliRunner().invoke(main, args)
    if result.exit_code == 0:
        return
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    if result.exit_code == 2 and "Traceback" not in result.output:
        raise LlmcError(result.output.strip().splitlines()[-1] if result.output.strip() else "exit 2")
    raise RuntimeError(f"exit {result.exit_code}: {result.output[-500:]}")


OPS = {"load_source": _op_load_source, "compile": _op_compile, "load_artifact": _op_load_artifact,
       "inspect": _op_inspect, "cli": _op_cli}


def _serve() -> None:
    import logging

    channel = os.fdopen(os.dup(1), "w")  # answers go here; anything a case prints goes to stderr
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    logging.disable(logging.WARNING)
    import llmc.driver  # noqa: F401  (import once, before the first case)
    from llmc.compiler.errors import LlmcError

    for line in sys.stdin:
        request = json.loads(line)
        try:
            OPS[request["op"]](**request["args"])
            answer: dict[str, Any] = {"status": "ok"}
        except LlmcError as exc:
            answer = {"status": "error", "type": type(exc).__name__, "detail": str(exc)}
        except BaseException as exc:  # what the fuzz suite looks for
            answer = {"status": "crash", "type": type(exc).__name__, "detail": traceback.format_exc()[-3000:]}
        channel.write(json.dumps(answer) + "\n")
        channel.flush()


if __name__ == "__main__":
    _serve()
