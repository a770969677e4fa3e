"""canao's TIR code-generation pipeline: TVM's own, with small buffers on the stack.

TVM 0.27 serves every buffer allocated inside a kernel from its workspace pool
(``TVMBackendAllocWorkspace`` and ``TVMBackendFreeWorkspace``, two calls into the runtime
per allocation) unless the buffer is in ``global`` scope and smaller than 1 KB. A kernel's
register tile and scratch rows live in ``local`` scope, and each parallel task allocates its
own. So they were allocated and freed again for every tile. Measured at 1 thread on a
64 x 128 x 384 int8 dense layer: 4 workspace calls per 4 x 64 tile came to about 250 ns,
against a tile's 165 ns of ``vpdpbusd``. In the fp32 attention kernel there were 10 per
(batch, head) task.

:func:`small_allocations_on_stack` marks each allocation with a known constant size of at
most :data:`STACK_BUDGET_BYTES` with TVM's ``disable_lower_builtin``. LLVM then gets a
plain ``alloca``: TVM's code generator places it in the function's entry block, and SROA
promotes a register tile that is indexed by constants to registers. The threshold is far
below a thread's stack (8 MB here). The other passes are TVM's default ``s_tir`` pipeline,
unchanged.
"""

from __future__ import annotations

from typing import Any

# Name under which the pipeline is registered with TVM (``tir_pipeline=`` of
# ``relax.build`` / ``tvm.tirx.build``).
TIR_PIPELINE = "canao"
# Largest allocation moved to the stack. The biggest today is the attention kernel's
# 16 KB score block.
STACK_BUDGET_BYTES = 64 * 1024
_NO_WORKSPACE = "disable_lower_builtin"  # TVM's kDisableLowerTVMBuiltin


def _constant_bytes(buffer: Any) -> int | None:
    import tvm_ffi

    elements = 1
    for extent in buffer.shape:
        if not hasattr(extent, "value"):
            return None  # a symbolic extent: leave it to the workspace pool
        elements *= int(extent.value)
    dtype = tvm_ffi.dtype(str(buffer.dtype))
    return elements * dtype.bits * dtype.lanes // 8


def _on_stack(allocation: Any) -> Any:
    from tvm import tirx

    if _NO_WORKSPACE in allocation.annotations:
        return allocation
    size = _constant_bytes(allocation.buffer)
    if size is None or size > STACK_BUDGET_BYTES:
        return allocation
    annotations = {**allocation.annotations, _NO_WORKSPACE: tirx.IntImm("bool", 1)}
    return tirx.AllocBuffer(allocation.buffer, annotations)


def small_allocations_on_stack() -> Any:
    """The pass: CPU kernels' small constant-size allocations become stack allocations."""
    import tvm
    import tvm_ffi
    from tvm import tirx

    @tvm.tirx.transform.prim_func_pass(opt_level=0, name="canao.SmallAllocationsOnStack")
    def transform(func: Any, _mod: Any, _ctx: Any) -> Any:
        target = func.attrs.get("target") if func.attrs else None
        if target is not None and target.kind.name not in ("llvm", "c"):
            return func  # device kernels: shared/local memory means something else there
        return tvm_ffi.structural_map(func, [(tirx.AllocBuffer, _on_stack)])

    return transform


def _canao_tir_pipeline() -> tuple[Any, Any, Any]:
    import tvm
    from tvm import tirx
    from tvm.s_tir.pipeline import default_s_tir_pipeline

    lower, _default_host, finalize_device = default_s_tir_pipeline()

    def finalize_host() -> Any:
        # As TVM's finalize_host_passes, with the stack pass just before the allocations
        # are lowered to runtime calls.
        return tvm.ir.transform.Sequential(
            [
                small_allocations_on_stack(),
                tirx.transform.LowerTVMBuiltin(),
                tirx.transform.LowerIntrin(),
            ]
        )

    return lower, finalize_host, finalize_device


def register() -> str:
    """Register the pipeline with TVM (idempotent); its name, for ``tir_pipeline=``."""
    from tvm.tirx import compilation_pipeline

    compilation_pipeline.register_tir_pipeline(TIR_PIPELINE, _canao_tir_pipeline)
    return TIR_PIPELINE
