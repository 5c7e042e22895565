"""The Apache TVM target: the IR lowered to Relax over TVM's paged KV cache, compiled with
``tvm.compile`` for ``llvm`` (CPU, runs here), ``cuda`` and ``rocm`` (cross-compiled).

``tvm`` is imported lazily, only by the modules of this package that need it.
"""
