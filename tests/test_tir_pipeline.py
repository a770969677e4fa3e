"""canao's TIR pipeline: small per-task buffers on the stack, big ones from the workspace."""

from __future__ import annotations

import numpy as np
import pytest

from canao.compiler.pipelines import codegen_pipeline
from canao.compiler.tir_pipeline import STACK_BUDGET_BYTES, TIR_PIPELINE, register

WORKSPACE_CALL = "@__TVMBackendAllocWorkspace"


def _scratch_kernel(elements: int, scope: str) -> object:
    """``y[i, :] = 2 * x[i, :]`` through a scratch row of ``elements`` floats per task."""
    from tvm.script import tirx as T

    @T.prim_func(s_tir=True)
    def kernel(x: T.Buffer((8, elements), "float32"), y: T.Buffer((8, elements), "float32")):
        for i in T.parallel(8):
            scratch = T.alloc_buffer((elements,), "float32", scope=scope)
            for j in range(elements):
                scratch[j] = x[i, j] * T.float32(2)
            for j in range(elements):
                y[i, j] = scratch[j]

    return kernel


def _build(func: object, tir_pipeline: str) -> tuple[object, str]:
    import tvm

    from canao.compiler.targets import get_target

    lib = tvm.compile(
        tvm.IRModule({"main": func}),
        target=get_target("x86").tvm_target(),
        tir_pipeline=tir_pipeline,
    )
    return lib, lib.mod.inspect_source("ll")


def _calls_workspace(ll: str) -> bool:
    # The global is declared in every module; a call loads it first.
    return f"load ptr, ptr {WORKSPACE_CALL}" in ll


def _doubles(lib: object, elements: int) -> None:
    import tvm

    x = np.random.default_rng(0).standard_normal((8, elements)).astype(np.float32)
    y = tvm.runtime.empty((8, elements), "float32", tvm.cpu())
    lib["main"](tvm.runtime.tensor(x), y)  # type: ignore[index]
    np.testing.assert_array_equal(y.numpy(), 2 * x)


@pytest.mark.parametrize("scope", ["local", "global"])
def test_small_scratch_goes_on_the_stack(scope: str) -> None:
    register()
    func = _scratch_kernel(256, scope)
    tvm_lib, tvm_ll = _build(func, "default")
    lib, ll = _build(func, TIR_PIPELINE)
    # TVM serves a local buffer of any size, and a global one of 1 KB (256 floats) or more,
    # from its workspace pool, once per task; canao's pipeline gives it a stack slot.
    assert _calls_workspace(tvm_ll)
    assert not _calls_workspace(ll)
    _doubles(lib, 256)
    _doubles(tvm_lib, 256)


def test_big_scratch_stays_in_the_workspace() -> None:
    register()
    elements = STACK_BUDGET_BYTES // 4 + 16
    lib, ll = _build(_scratch_kernel(elements, "local"), TIR_PIPELINE)
    assert _calls_workspace(ll)
    _doubles(lib, elements)


def test_int8_dense_tile_has_no_workspace_calls() -> None:
    from canao.compiler.schedules.dense_int8 import Int8Tiling, dense_int8_primfunc

    register()
    func = dense_int8_primfunc(8, 64, 128, "bias_gelu", Int8Tiling())
    assert _calls_workspace(_build(func, "default")[1])  # the register tile, per tile
    assert not _calls_workspace(_build(func, TIR_PIPELINE)[1])


def test_canao_pipelines_generate_code_with_canao_tir_pipeline() -> None:
    assert codegen_pipeline("fast") == TIR_PIPELINE
    assert codegen_pipeline("fast-int8") == TIR_PIPELINE
    # TVM's own pipelines stay what tvm.compile does.
    assert codegen_pipeline("default") == "default"
    assert codegen_pipeline("default-fused") == "default"
    assert codegen_pipeline("fast", "cuda") == "default"  # GPUs: TVM's code generation
