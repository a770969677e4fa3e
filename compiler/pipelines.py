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


def _cpu_pipeline(target: object, canao_fusion: bool) -> object:
    """canao's CPU schedules, with or without canao's fusion passes (:mod:`canao.fusion`).

    Analytic schedules, no tuning: a new architecture builds in seconds.
    """
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic.pipeline import dataflow_lower_passes, finalize_passes
    from tvm.s_tir import dlight

    from canao.compiler.schedules.dense import choose_tiling
    from canao.compiler.schedules.pack_dense import pack_dense_weights
    from canao.compiler.schedules.rules import default_rules
    from canao.compiler.schedules.vector_math import vectorised_math
    from canao.fusion.algebraic import fold_scale_into_dense, simplify_elementwise
    from canao.fusion.residual_layernorm import fuse_residual_layer_norm

    fusion = [
        simplify_elementwise(),
        fold_scale_into_dense(),  # attention scale -> query/key weights
        simplify_elementwise(),
        relax.transform.DeadCodeElimination(),
    ]
    return tvm.transform.Sequential(
        [
            relax.transform.FoldConstant(),  # weight transposes -> constant W[K, N]
            *(fusion if canao_fusion else []),
            pack_dense_weights(choose_tiling(target), fuse_epilogues=canao_fusion),
            vectorised_math(),  # libm's scalar expf/erff would dominate softmax and GELU
            *([fuse_residual_layer_norm()] if canao_fusion else []),
            relax.transform.LegalizeOps(),
            relax.transform.AnnotateTIROpPattern(),
            relax.transform.FoldConstant(),
            relax.transform.FuseOps(),
            relax.transform.FuseTIR(),
            dlight.ApplyDefaultSchedule(*default_rules()),
            *dataflow_lower_passes(target),
            *finalize_passes(target),
        ],
        name="canao.fast" if canao_fusion else "canao.fast-tvm-fusion",
    )


def _canao_fast(target: object) -> object:
    from tvm import relax

    if "gpu" in target.keys:  # type: ignore[attr-defined]
        return relax.get_default_pipeline(target)  # GPU schedules: issue 8
    return _cpu_pipeline(target, canao_fusion=True)


def _canao_fast_tvm_fusion(target: object) -> object:
    from tvm import relax

    if "gpu" in target.keys:  # type: ignore[attr-defined]
        return relax.get_default_pipeline(target)
    return _cpu_pipeline(target, canao_fusion=False)


# What the CLI, the benchmarks and the search use unless told otherwise.
DEFAULT_PIPELINE = "fast"

PIPELINES: dict[str, PipelineFactory] = {
    "default": _tvm_default,
    "default-fused": _tvm_default_fused,
    "fast": _canao_fast,
    "fast-tvm-fusion": _canao_fast_tvm_fusion,
}


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
