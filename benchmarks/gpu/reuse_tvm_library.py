#!/usr/bin/env python
"""Rebuild a tvm artifact on a host that has only TVM's runtime, reusing a prebuilt library.

The apache-tvm wheel (96 MiB, 247 MiB of it the compiler) often cannot go to a GPU host, and a
real model's weights are too large to ship with the library. So the library is compiled where
the full wheel is (``llmc compile SOURCE --target tvm --device cuda --arch h100 -o PREBUILT``),
``PREBUILT`` travels without ``weights/``, and this script recompiles ``SOURCE`` here with the
options recorded in its manifest (same front end, passes and quantization), taking the target
payload (``model.so`` + ``tvm.json``) from ``PREBUILT`` instead of calling TVM. The library and
the weights agree only if both come from the same IR: the script refuses unless the new
``ir/final.ir`` equals the prebuilt one (but for the ``meta`` line naming the source's path).

    python benchmarks/gpu/reuse_tvm_library.py SOURCE PREBUILT OUT
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any
from unittest import mock

from llmc.driver import CompileOptions, compile_model
from llmc.errors import ArtifactError
from llmc.runtime.artifact import IR_FILE
from llmc.runtime.target import EmitResult
from llmc.targets.tvm.target import LIBRARY, PAYLOAD, TvmTarget


def options_from_manifest(manifest: dict[str, Any]) -> CompileOptions:
    saved = dict(manifest["compile_options"])
    for key in ("dump_ir", "calib_file", "eval_file"):
        if saved.get(key):
            raise ArtifactError(f"the prebuilt artifact was compiled with --{key.replace('_', '-')}; "
                                "rebuild it without that option to reuse its library")
        saved[key] = None
    saved["quant_override"] = tuple(saved.get("quant_override") or ())
    return CompileOptions(**saved)


def reuse(source: Path, prebuilt: Path, out: Path) -> Path:
    manifest = json.loads((prebuilt / "manifest.json").read_text())
    if manifest["target"]["name"] != "tvm":
        raise ArtifactError(f"{prebuilt} is a {manifest['target']['name']} artifact, not a tvm one")
    options = options_from_manifest(manifest)

    def emit(self: TvmTarget, module: Any, weights: Any, writer: Any, _options: dict[str, Any]) -> EmitResult:
        for name in (LIBRARY, PAYLOAD):
            shutil.copyfile(prebuilt / name, writer.path(name))
        notes = [*manifest["target"]["notes"], f"library reused from {prebuilt} (built there with full TVM)"]
        return EmitResult(options=manifest["target"]["options"], files=[LIBRARY, PAYLOAD], notes=notes)

    with mock.patch.object(TvmTarget, "emit", emit), mock.patch.object(TvmTarget, "availability", lambda self: None):
        path = compile_model(source, out, options)
    if _ir_body(path / IR_FILE) != _ir_body(prebuilt / IR_FILE):
        shutil.rmtree(path, ignore_errors=True)
        raise ArtifactError("the IR compiled here differs from the prebuilt library's: different model or llmc "
                            "version; the library would not match these weights")
    return path


def _ir_body(path: Path) -> str:
    """The IR text without its ``meta`` line (which names the source's path on each machine)."""
    return "".join(line for line in path.read_text().splitlines(keepends=True) if not line.startswith("meta "))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", type=Path)
    parser.add_argument("prebuilt", type=Path)
    parser.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    print(f"wrote {reuse(args.source, args.prebuilt, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
