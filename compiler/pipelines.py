"""Named Relax build pipelines, kept in one map.

A pipeline turns an imported high-level IRModule into a lowered module ready
for VM code generation (``relax.build(..., relax_pipeline=None)``). Keeping
the lowered module lets canao count kernels and feed the latency predictor.

- ``default``: exactly what ``tvm.compile(mod, target)`` does out of the box
  (on CPU: legalize and lower, no operator fusion, no schedules).
- ``default-fused``: TVM's per-target default pipeline (``relax.get_default_pipeline``):
  on CPU adds FuseOps/FuseTIR; on GPU adds DLight schedules.
- ``fast`` (canao's default): pre-packed register-blocked dense kernels with
  fused bias/GELU, vectorised softmax, dlight-style rules for everything else
  (:mod:`canao.compiler.schedules`) and canao's fusion passes (:mod:`canao.fusion`);
  on GPU, TVM's default GPU pipeline for now.
- ``fast-tvm-fusion``: the same schedules with TVM's own fusion only (FuseOps):
  the baseline canao's fusion is measured against.

Later pipelines (schedules, polynomial fusion) register here with
:func:`register_pipeline`.
"""

from __future__ import annotations

from collections.abc import Callable

from canao.errors import UnknownPipelineError

# A factory takes the tvm.target.Target and returns a tvm.transform.Pass.
PipelineFactory = Callable[[object], object]


def _tvm_default(target: object) -> object:
    from tvm import relax

    if "gpu" in target.keys:  # type: ignore[attr-defined]
        # On GPU, tvm.compile itself switches to the target pipeline: unscheduled TIR
        # has no thread bindings and cannot run there.
        return relax.get_default_pipeline(target)
    return relax.get_pipeline("default")


def _tvm_default_fused(target: object) -> object:
    from tvm import relax

    return relax.get_default_pipeline(target)


def cpu_stages(
    target: object,
    canao_fusion: bool,
    approximate: bool = False,
    int8: bool = False,
    int8_full_range: bool = False,
) -> list[tuple[str, object]]:
    """The named passes of canao's CPU pipelines, in order (the fusion report walks them).

    Analytic schedules, no tuning: a new architecture builds in seconds.
    """
    from tvm import relax
    from tvm.relax.backend.cpu_generic.pipeline import dataflow_lower_passes, finalize_passes
    from tvm.s_tir import dlight

    from canao.compiler.schedules.dense import choose_tiling, vector_lanes
    from canao.compiler.schedules.dense_int8 import int8_tiling
    from canao.compiler.schedules.pack_dense import pack_dense_weights
    from canao.compiler.schedules.rules import default_rules
    from canao.compiler.schedules.vector_math import vectorised_math
    from canao.fusion.algebraic import (
        fold_constant_transposes,
        fold_scale_into_dense,
        simplify_elementwise,
    )
    from canao.fusion.attention import fuse_attention
    from canao.fusion.merge_dense import merge_parallel_dense
    from canao.fusion.residual_layernorm import fuse_residual_layer_norm

    def seq(*passes: object) -> object:
        import tvm

        return tvm.transform.Sequential(list(passes))

    fusion = [
        ("simplify_elementwise", seq(simplify_elementwise())),
        # attention scale -> query/key weights, then tidy what that exposed
        (
            "fold_scale_into_dense",
            seq(
                fold_scale_into_dense(),
                simplify_elementwise(),
                relax.transform.DeadCodeElimination(),
            ),
        ),
        ("merge_parallel_dense", merge_parallel_dense()),  # Q, K, V: one product
    ]
    tiling = choose_tiling(target)
    return [
        # weight transposes -> W[K, N] (in NumPy: FoldConstant would compile a kernel each)
        ("fold_constants", seq(fold_constant_transposes(), relax.transform.FoldConstant())),
        *(fusion if canao_fusion else []),
        (
            "pack_dense" + ("_with_epilogues" if canao_fusion else ""),
            pack_dense_weights(
                tiling,
                fuse_epilogues=canao_fusion,
                approximate=approximate,
                int8=int8_tiling(target, int8_full_range) if int8 else None,
            ),
        ),
        # Q/K/V slices -> one attention kernel (needs the packed Q/K/V output and the softmax).
        *(
            [("fuse_attention", fuse_attention(vector_lanes(target), approximate))]
            if canao_fusion
            else []
        ),
        ("vectorised_math", vectorised_math(approximate)),  # libm's scalar expf/erff would dominate
        *([("fuse_residual_layer_norm", fuse_residual_layer_norm())] if canao_fusion else []),
        (
            "tvm_fuse_ops",
            seq(
                relax.transform.LegalizeOps(),
                relax.transform.AnnotateTIROpPattern(),
                relax.transform.FoldConstant(),
                relax.transform.FuseOps(),
                relax.transform.FuseTIR(),
            ),
        ),
        ("schedule", dlight.ApplyDefaultSchedule(*default_rules())),
        ("lower", seq(*dataflow_lower_passes(target), *finalize_passes(target))),
    ]


def _cpu_pipeline(
    target: object,
    canao_fusion: bool,
    approximate: bool = False,
    int8: bool = False,
    int8_full_range: bool = False,
) -> object:
    import tvm

    stages = cpu_stages(target, canao_fusion, approximate, int8, int8_full_range)
    return tvm.transform.Sequential(
        [stage for _, stage in stages],
        name="canao.fast" if canao_fusion else "canao.fast-tvm-fusion",
    )


# canao's CPU pipelines, as cpu_stages() flags.
_CPU_PIPELINE_FLAGS: dict[str, dict[str, bool]] = {
    "fast": {"canao_fusion": True},
    "fast-tvm-fusion": {"canao_fusion": False},
    "fast-approx": {"canao_fusion": True, "approximate": True},
    "fast-int8": {"canao_fusion": True, "int8": True},
    "fast-int8-full-range": {"canao_fusion": True, "int8": True, "int8_full_range": True},
}


def codegen_pipeline(name: str, device_type: str = "cpu") -> str:
    """The TIR pipeline that generates code for relax pipeline ``name`` on ``device_type``.

    canao's pipelines on a CPU get :mod:`canao.compiler.tir_pipeline` (small buffers on the
    stack, not in TVM's workspace pool); TVM's own pipelines, and GPUs, keep TVM's, so
    ``default`` stays exactly what ``tvm.compile`` does.
    """
    from canao.compiler.tir_pipeline import register

    return register() if name in _CPU_PIPELINE_FLAGS and device_type == "cpu" else "default"


def split_pipeline(name: str, target: object) -> tuple[object, object] | None:
    """(every stage but ``lower``, ``lower``) of a canao CPU pipeline; None for the others.

    Every stage before ``lower`` rewrites inside one function, so a module stitched from
    separately transformed segments (:mod:`canao.compiler.segments`) needs only ``lower``.
    """
    import tvm

    flags = _CPU_PIPELINE_FLAGS.get(name)
    if flags is None or "gpu" in target.keys:  # type: ignore[attr-defined]
        return None
    stages = cpu_stages(target, **flags)
    assert stages[-1][0] == "lower"
    before = tvm.transform.Sequential([stage for _, stage in stages[:-1]], name=f"canao.{name}")
    return before, stages[-1][1]


def _gpu_pipeline(target: object) -> object:
    """canao's exact graph rewrites, then TVM's GPU pipeline (dlight GPU schedules).

    The algebraic passes and the Q/K/V merge are target-independent; the CPU-only
    stages (packed dense kernels, residual+layer-norm kernel, CPU vector math)
    are left out, and dlight's GPU rules schedule every remaining kernel.
    """
    import tvm
    from tvm import relax

    from canao.fusion.algebraic import fold_scale_into_dense, simplify_elementwise
    from canao.fusion.merge_dense import merge_parallel_dense

    return tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),
            simplify_elementwise(),
            fold_scale_into_dense(),
            simplify_elementwise(),
            relax.transform.DeadCodeElimination(),
            merge_parallel_dense(),
            relax.get_default_pipeline(target),
        ],
        name="canao.fast-gpu",
    )


def _canao_fast(target: object) -> object:
    if "gpu" in target.keys:  # type: ignore[attr-defined]
        return _gpu_pipeline(target)
    return _cpu_pipeline(target, canao_fusion=True)


def _canao_fast_tvm_fusion(target: object) -> object:
    from tvm import relax

    if "gpu" in target.keys:  # type: ignore[attr-defined]
        return relax.get_default_pipeline(target)
    return _cpu_pipeline(target, canao_fusion=False)


# What the CLI, the benchmarks and the search use unless told otherwise.
DEFAULT_PIPELINE = "fast"


def _canao_fast_approx(target: object) -> object:
    from tvm import relax

    if "gpu" in target.keys:  # type: ignore[attr-defined]
        return relax.get_default_pipeline(target)
    return _cpu_pipeline(target, canao_fusion=True, approximate=True)


def _canao_fast_int8(target: object, full_range: bool = False) -> object:
    if "gpu" in target.keys:  # type: ignore[attr-defined]
        raise UnknownPipelineError("the int8 pipelines are CPU-only (x86 and aarch64) for now")
    return _cpu_pipeline(target, canao_fusion=True, int8=True, int8_full_range=full_range)


def _canao_fast_int8_full_range(target: object) -> object:
    return _canao_fast_int8(target, full_range=True)


PIPELINES: dict[str, PipelineFactory] = {
    "default": _tvm_default,
    "default-fused": _tvm_default_fused,
    "fast": _canao_fast,
    "fast-tvm-fusion": _canao_fast_tvm_fusion,
    # Opt-in lossy math: I-BERT polynomial GELU/exp (bounds in vector_math).
    "fast-approx": _canao_fast_approx,
    # Dynamic-range int8 dense layers (schedules.dense_int8): lossy, checked against a
    # PyTorch model quantized the same way (compiler.quantized).
    "fast-int8": _canao_fast_int8,
    # The same with 8-bit activations on every CPU: on AVX2 without VNNI the fastest int8
    # kernel quantizes activations to 7 bits (dense_int8.ISAS, "avx2-u7"); this one does not.
    "fast-int8-full-range": _canao_fast_int8_full_range,
}
INT8_PIPELINES = frozenset({"fast-int8", "fast-int8-full-range"})
# ``--precision`` -> the pipeline that builds it (search, prune, compile, bench, compare).
PRECISIONS = {"fp32": "fast", "int8": "fast-int8"}


def int8_full_range(pipeline: str) -> bool:
    """Whether int8 pipeline ``pipeline`` keeps 8-bit activations on every CPU."""
    return _CPU_PIPELINE_FLAGS.get(pipeline, {}).get("int8_full_range", False)


def precision_pipeline(precision: str) -> str:
    try:
        return PRECISIONS[precision]
    except KeyError:
        raise UnknownPipelineError(
            f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}"
        ) from None


def register_pipeline(name: str, factory: PipelineFactory) -> None:
    if name in PIPELINES:
        raise ValueError(f"pipeline {name!r} is already registered")
    PIPELINES[name] = factory


def get_pipeline(name: str, target: object) -> object:
    """The pass for pipeline ``name`` on ``target``; an unknown name lists the valid ones."""
    try:
        factory = PIPELINES[name]
    except KeyError:
        raise UnknownPipelineError(
            f"unknown pipeline {name!r}; valid pipelines: {', '.join(PIPELINES)}"
        ) from None
    return factory(target)
