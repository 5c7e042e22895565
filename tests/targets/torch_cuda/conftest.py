"""Sets ``TRITON_INTERPRET=1`` before any kernel module of this folder is imported (Triton reads it when a
kernel is defined), unless a CUDA GPU will run the kernels; see :mod:`tests.targets.torch_cuda.device`."""

from tests.targets.torch_cuda import device  # noqa: F401 - the import sets the variable
