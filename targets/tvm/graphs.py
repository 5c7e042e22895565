"""What TVM's RewriteCUDAGraph captured: per VM function, the kernels run inside CUDA graphs and outside.

Read from the compiled VM executable's text (``Executable.as_text()``): a function's body is a list
of ``call`` instructions; ``vm.builtin.cuda_graph.run_or_capture`` names a capture function
(``f[...]``) whose kernel calls run as one graph (captured on the first call, replayed after).
Kernel calls are the calls of anything but ``vm.builtin.*`` (TIR PrimFuncs: the device kernels and
their host wrappers).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_CAPTURE = re.compile(r"vm\.builtin\.cuda_graph\.run_or_capture\s+in:\s*%vm,\s*f\[([^\]]+)\]")


@dataclass
class GraphCoverage:
    """One VM function: its kernel calls inside captured graphs (``graphs``, one list per capture) and
    the ones it launches itself (``outside``)."""

    graphs: list[list[str]] = field(default_factory=list)
    outside: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        return {"graphs": len(self.graphs), "captured_kernel_calls": sum(map(len, self.graphs)),
                "outside": self.outside}


def _bodies(text: str) -> dict[str, list[str]]:
    """Function name -> its ``call`` lines' callee and arguments."""
    bodies: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in text.splitlines():
        if line.startswith("@") and line.rstrip().endswith(":"):
            current = bodies.setdefault(line[1:].rstrip()[:-1], [])
        elif not line.strip() or line.startswith("@"):
            current = None
        elif current is not None and line.lstrip().startswith("call "):
            current.append(line.strip()[len("call "):].strip())
    return bodies


def _kernels(calls: list[str]) -> list[str]:
    return [c.split()[0] for c in calls if not c.split()[0].startswith("vm.builtin.")]


def graph_coverage(text: str, functions: list[str]) -> dict[str, GraphCoverage]:
    """The coverage of each of ``functions`` in the executable whose text is ``text``."""
    bodies = _bodies(text)
    out = {}
    for name in functions:
        calls = bodies.get(name, [])
        captures = [m.group(1) for c in calls if (m := _CAPTURE.search("call " + c))]
        out[name] = GraphCoverage([_kernels(bodies.get(cap, [])) for cap in captures], _kernels(calls))
    return out
