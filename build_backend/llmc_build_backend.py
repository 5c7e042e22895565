"""setuptools' build backend with one change to editable installs: llmc's import finder goes first.

setuptools puts an editable install's finder at the end of ``sys.meta_path``, after the finder that
searches ``sys.path`` (pypa/setuptools#3557). Started in the folder above a clone (a folder named
``llmc``), Python's own search finds the clone as an empty namespace package before the editable
finder is asked, and ``from llmc import Engine`` fails. The editable wheel built here carries one more
``.pth`` file, read after setuptools' own (``.pth`` files are read in name order), that moves llmc's
finder to the front of ``sys.meta_path``; it answers only for llmc's own module names.
Regular (non-editable) installs are unchanged: a package with ``__init__.py`` in site-packages
already wins over a namespace folder.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks this module does not change)

FIRST_PTH = "llmc-editable-finder-first.pth"


def build_editable(wheel_directory: str, config_settings: dict | None = None,
                   metadata_directory: str | None = None) -> str:
    """setuptools' editable wheel, plus :data:`FIRST_PTH` when it installs a finder."""
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_finder_first(Path(wheel_directory) / name)
    return name


def _record_hash(data: bytes) -> str:
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def add_finder_first(wheel: Path) -> bool:
    """Add :data:`FIRST_PTH` (and its RECORD line) to an editable wheel; False when it has no finder."""
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        finders = [n for n in names if "/" not in n and n.startswith("__editable___") and n.endswith("_finder.py")]
        if len(finders) != 1 or FIRST_PTH in names:
            return False
        module = finders[0][: -len(".py")]
        # site.py runs the line with exec() inside a function: no lambda or comprehension (they would
        # not see the names it binds)
        line = (f"import sys, {module}; finder = {module}._EditableFinder; "
                "finder in sys.meta_path and sys.meta_path.remove(finder); sys.meta_path.insert(0, finder)\n")
        pth = line.encode()
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        partial = wheel.with_name(wheel.name + ".part")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == record:
                    data += f"{FIRST_PTH},{_record_hash(pth)},{len(pth)}\n".encode()
                dst.writestr(info, data)
            dst.writestr(FIRST_PTH, pth)
    os.replace(partial, wheel)
    return True
