"""setuptools' build backend with one change to editable installs: a folder named ``llmc`` in the
working directory no longer hides the install.

setuptools puts an editable install's finder at the end of ``sys.meta_path``, after the finder that
searches ``sys.path`` (pypa/setuptools#3557). Started in the folder above a clone (a folder named
``llmc``), Python's own search finds the clone as an empty namespace package before the editable
finder is asked, and ``from llmc import Engine`` fails. The editable wheel built here carries a
small guard module and a ``.pth`` file that puts the guard first in ``sys.meta_path``: for the name
``llmc`` it asks the ``sys.path`` search, keeps what it finds when that is a real package or module
(so ``PYTHONPATH`` keeps its precedence), and otherwise (a namespace folder, or nothing) asks the
editable finder. Regular (non-editable) installs are unchanged: a package with ``__init__.py`` in
site-packages already wins over a namespace folder.
"""

from __future__ import annotations

import base64
import hashlib
import os
import zipfile
from pathlib import Path

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks this module does not change)

GUARD_MODULE = "_llmc_editable_guard"
GUARD_PTH = "llmc-editable-guard.pth"

GUARD_SOURCE = '''"""Put in place by llmc's build backend (build_backend/llmc_build_backend.py) for an editable
install: a folder named llmc on sys.path (a clone, in the working directory) must not hide it."""

import sys
from importlib.machinery import PathFinder

import {finder} as _editable


class NamespaceGuard:
    """For ``llmc`` only: the sys.path search's answer when it is a real package or module, else
    the editable install's."""

    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname != "llmc":
            return None
        spec = PathFinder.find_spec(fullname, path, target)
        if spec is not None and spec.origin not in (None, "namespace"):
            return spec
        return _editable._EditableFinder.find_spec(fullname, path, target)


def install():
    if NamespaceGuard not in sys.meta_path:
        sys.meta_path.insert(0, NamespaceGuard)
'''


def build_editable(wheel_directory: str, config_settings: dict | None = None,
                   metadata_directory: str | None = None) -> str:
    """setuptools' editable wheel, plus the guard when it installs a finder."""
    name = _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
    add_namespace_guard(Path(wheel_directory) / name)
    return name


def _record_line(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def add_namespace_guard(wheel: Path) -> bool:
    """Add the guard module and its ``.pth`` (and their RECORD lines) to an editable wheel; False
    when the wheel has no editable finder (another editable mode) or has the guard already."""
    with zipfile.ZipFile(wheel) as src:
        names = src.namelist()
        finders = [n for n in names if "/" not in n and n.startswith("__editable___") and n.endswith("_finder.py")]
        if len(finders) != 1 or GUARD_PTH in names:
            return False
        added = {
            f"{GUARD_MODULE}.py": GUARD_SOURCE.format(finder=finders[0][: -len(".py")]).encode(),
            GUARD_PTH: f"import {GUARD_MODULE}; {GUARD_MODULE}.install()\n".encode(),
        }
        record = next(n for n in names if n.endswith(".dist-info/RECORD"))
        partial = wheel.with_name(wheel.name + ".part")
        with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                data = src.read(info)
                if info.filename == record:
                    data += "".join(_record_line(n, d) for n, d in added.items()).encode()
                dst.writestr(info, data)
            for n, d in added.items():
                dst.writestr(n, d)
    os.replace(partial, wheel)
    return True
