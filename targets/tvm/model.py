"""The ``nn.Module`` a module is exported through: its packed params and one method per exported
function: ``prefill`` (ragged chunks, a symbolic token count), ``decode`` (one token per sequence,
a symbolic batch) and ``decode_b{N}`` for each batch bucket ``N`` (:func:`bucket_name`): ``decode``
specialised to ``N`` sequences, static shapes, so schedules (GEMV, low-batch GEMV), meta-schedule
tuning and CUDA graphs apply to it; the executor pads a batch up to its bucket.

Every function takes the step's inputs (:data:`~llmc.targets.tvm.paged.PREFILL_INPUTS` or
:data:`~llmc.targets.tvm.paged.DECODE_INPUTS`), then ``pages`` (one KV tensor per layer, written in
place: :mod:`llmc.targets.tvm.paged`), then the packed weights, and returns the logits. Each method
hands its IR function to a function lowering (:mod:`llmc.targets.tvm.lower`), which emits the
function's nodes as ``nn`` ops inside ``export_tvm``'s tracing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from llmc.compiler.ir.graph import Function, Module, ParamInfo
from llmc.compiler.packing import TensorPart, layout_for
from llmc.targets.tvm.paged import PagedKernels
from llmc.targets.tvm.rope import RopePlan, interleaved_to_half

BUCKET_PREFIX = "decode_b"


def bucket_name(batch: int) -> str:
    """The decode function specialised to ``batch`` sequences."""
    return f"{BUCKET_PREFIX}{batch}"


def bucket_of(name: str) -> int | None:
    """The batch of a bucket function's name (None for other functions)."""
    if name.startswith(BUCKET_PREFIX) and name[len(BUCKET_PREFIX):].isdigit():
        return int(name[len(BUCKET_PREFIX):])
    return None


DECODE_ONE = bucket_name(1)
"""The batch-1 decode: its matrix-vector kernels get llmc's GEMV schedule and meta-schedule tuning on CPUs."""

RunFunction = Callable[[Any, Function, dict[str, Any], list[Any], bool, bool], Any]
"""``run(model, fn, inputs, pages, permute_qk, decode) -> logits``: lowers one IR function while tracing."""


def param_parts(info: ParamInfo) -> list[TensorPart]:
    """The tensors a param is passed to the VM as: the float weight, or the parts of llmc's packed layout."""
    shape = tuple(int(d) for d in info.type.shape)
    if info.quant is None:
        return [TensorPart("weight", shape, info.type.dtype)]
    return list(layout_for(info.quant, (shape[0], shape[1])).parts())


def activation_dtype(module: Module) -> str:
    for fn in module:
        for node in fn.nodes:
            if node.op == "embedding":
                return str(node.attrs["dtype"])
    return "float32"


def build_model_class(module: Module, plan: RopePlan, target: Any, kernels: PagedKernels, run: RunFunction,
                      buckets: Sequence[int]) -> type:
    """An ``nn.Module`` class whose methods run the IR functions of ``module`` through ``run``."""
    from tvm.relax.frontend import nn

    config = module.config
    head_dim = int(config["head_dim"])
    used = sorted(module.referenced_params())
    kv_dtype = activation_dtype(module)
    perm = interleaved_to_half(head_dim, plan.rotary_dim) if plan.permute else None

    class LlmcModel(nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            self.kv_dtype = kv_dtype
            self.kernels = kernels
            self.nibble_pairs = target.kind.name == "llvm"  # 4-bit matmuls over code bytes (quantized_linear)
            self.module_params = module.params
            self.weights = nn.ParameterDict()
            self.slot_of: dict[str, tuple[str, str]] = {}
            self.tensors: dict[str, dict[str, Any]] = {}
            for index, name in enumerate(used):
                parts = {}
                for part in param_parts(module.params[name]):
                    key = f"p{index}_{part.name}"
                    self.weights[key] = nn.Parameter(part.shape, part.dtype)
                    self.slot_of[key] = (name, part.name)
                    parts[part.name] = self.weights[key]
                self.tensors[name] = parts
            self.perm = None if perm is None else nn.Tensor.from_const(perm)

        def prefill(self, input_ids: Any, positions: Any, slots: Any, q_indptr: Any, page_indptr: Any,
                    page_values: Any, last_page_len: Any, logits_index: Any, pages: Any) -> Any:
            inputs = {"input_ids": input_ids, "positions": positions, "slots": slots, "q_indptr": q_indptr,
                      "page_indptr": page_indptr, "page_values": page_values, "last_page_len": last_page_len,
                      "logits_index": logits_index}
            return run(self, module.functions["prefill"], inputs, list(pages), perm is not None, False)

        def decode(self, input_ids: Any, positions: Any, slots: Any, page_indptr: Any, page_values: Any,
                   last_page_len: Any, pages: Any) -> Any:
            inputs = {"input_ids": input_ids, "positions": positions, "slots": slots, "page_indptr": page_indptr,
                      "page_values": page_values, "last_page_len": last_page_len}
            return run(self, module.functions["decode"], inputs, list(pages), perm is not None, True)

    for batch in buckets:  # the same method under each bucket's name; export_tvm gives each its shapes
        setattr(LlmcModel, bucket_name(batch), LlmcModel.decode)
    LlmcModel.__name__ = "LlmcModel"
    return LlmcModel
