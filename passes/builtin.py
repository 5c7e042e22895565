"""Imports every built-in pass so that it registers itself."""
from llmc.passes import (  # noqa: F401  (each module registers its passes)
    cse,
    dce,
    fold_rope,
    fuse_add_rmsnorm,
    fuse_gate_up,
    fuse_qkv,
    pack_qkv,
    share_tied_weights,
)
from llmc.passes import quantize as _quantize  # noqa: F401  (quantize)
