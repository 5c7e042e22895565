"""Where the Triton kernel tests run: on a CUDA GPU when there is one (compiled kernels), else on the CPU
under Triton's interpreter (``TRITON_INTERPRET=1``, set here, from this folder's conftest.py, before any
kernel module is imported, which is when Triton reads it). ``LLMC_TRITON_INTERPRET=1`` forces the
interpreter on a GPU host too."""

from __future__ import annotations

import importlib.util
import os

import torch

ON_GPU = torch.cuda.is_available() and os.environ.get("LLMC_TRITON_INTERPRET") != "1"
DEVICE = "cuda" if ON_GPU else "cpu"
if not ON_GPU:
    os.environ["TRITON_INTERPRET"] = "1"
HAVE_TRITON = importlib.util.find_spec("triton") is not None
TRITON_MISSING = "the Triton kernels need triton (pip install -e '.[triton]'; about 600 MB, so make test leaves it out)"
