"""dlight-style CPU schedule rules for the kernels a BERT leaves after fusion.

Dense layers with constant weights are handled before this point by
:mod:`canao.compiler.schedules.pack_dense`. What remains, and its rule:

- :class:`BatchMatmul`: activation x activation products (attention scores
  ``Q K^T`` and ``P V``), register-tiled like the dense kernel, unpacked.
- ``dlight.cpu.Reduction`` (TVM's): row-wise softmax / layer norm chains.
- :class:`Injective`: element-wise, reshape/transpose, gather chains: inline
  into one loop nest, parallel over cores, vectorised.

Each rule returns None when a function is not of its kind, and every failed
schedule attempt falls through to the next rule (then to TVM's naive code),
so a new operator can never break a build.
"""

from __future__ import annotations

from typing import Any

from tvm import s_tir, tirx
from tvm.s_tir.dlight import ScheduleRule, normalize_prim_func, try_inline
from tvm.s_tir.dlight.base import get_extent

from canao.compiler.schedules.dense import vector_lanes

# Fewer elements than this run on one core: fork/join would cost more than it saves.
_PARALLEL_MIN_ELEMENTS = 4096


class _CPURule(ScheduleRule):
    def is_target_available(self, target: Any) -> bool:
        return target.kind.name == "llvm"

    def apply(self, func: Any, target: Any, _tunable: bool) -> Any:
        if not isinstance(func, tirx.PrimFunc) or not self.is_target_available(target):
            return None
        try:
            return self.schedule(func, target)
        except Exception:
            # TVM reports an inapplicable primitive with several error types; any of
            # them means "not this rule", and the next rule (or naive code) takes over.
            return None

    def schedule(self, func: Any, target: Any) -> Any:
        raise NotImplementedError


def _static_extent(sch: Any, loop: Any) -> int | None:
    extent = get_extent(sch, loop)
    return extent if isinstance(extent, int) else None


class Injective(_CPURule):
    """All-spatial functions: one fused loop, split into (parallel chunks, vector lanes)."""

    def schedule(self, func: Any, target: Any) -> Any:
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks or not all(block.is_injective() for block in blocks):
            return None
        remaining = try_inline(sch, list(blocks))
        lanes = vector_lanes(target)
        for block in remaining:
            loops = sch.get_loops(block.block_rv)
            if not loops:
                continue
            fused = sch.fuse(*loops) if len(loops) > 1 else loops[0]
            extent = _static_extent(sch, fused)
            if extent is None or extent < lanes:
                continue
            outer, inner = sch.split(fused, [None, lanes])
            sch.vectorize(inner)
            if extent >= _PARALLEL_MIN_ELEMENTS:
                sch.parallel(outer)
        return sch


class BatchMatmul(_CPURule):
    """``C[b, i, j] = sum_k A[b, i, k] * B[b, k, j]`` (+ element-wise epilogue).

    Register tile ``mr x nb`` over (i, j) with ``k`` outside it, accumulators in
    a local buffer, (b, i-tiles) in parallel.
    """

    def schedule(self, func: Any, target: Any) -> Any:
        sch = s_tir.Schedule(func)
        blocks = normalize_prim_func(sch)
        if not blocks:
            return None
        blocks = try_inline(sch, list(blocks))
        reductions = [block for block in blocks if not block.is_injective()]
        if len(reductions) != 1 or reductions[0].dom_kind() not in ("SSSR", "SSR"):
            return None
        main = reductions[0]
        epilogues = [block for block in blocks if block is not main]
        if any(block.is_reduction() for block in epilogues):
            return None
        lanes = vector_lanes(target)
        loops = sch.get_loops(main.block_rv)
        batch, i, j, k = loops if len(loops) == 4 else (None, *loops)
        j_extent, i_extent = _static_extent(sch, j), _static_extent(sch, i)
        if j_extent is None or i_extent is None or j_extent % lanes:
            return None
        nb = 2 * lanes if j_extent % (2 * lanes) == 0 else lanes
        mr = 8 if lanes >= 16 else 6
        j_tile, j_lane = sch.split(j, [None, nb])
        i_tile, i_row = sch.split(i, [None, mr])
        outer = [batch, i_tile] if batch is not None else [i_tile]
        sch.reorder(*outer, j_tile, k, i_row, j_lane)
        tile = sch.fuse(*outer) if len(outer) > 1 else outer[0]
        sch.parallel(tile)
        sch.vectorize(j_lane)
        sch.unroll(i_row)
        acc = sch.cache_write(main.block_rv, 0, "local")
        sch.reverse_compute_at(acc, j_tile)
        for block in epilogues:
            sch.reverse_compute_inline(block.block_rv)
        sch.vectorize(sch.get_loops(acc)[-1])
        init = sch.decompose_reduction(main.block_rv, k)
        sch.vectorize(sch.get_loops(init)[-1])
        return sch


def default_rules() -> list[ScheduleRule]:
    """Rules in priority order, for ``dlight.ApplyDefaultSchedule``."""
    from tvm.s_tir import dlight

    return [BatchMatmul(), dlight.cpu.Reduction(), Injective(), dlight.cpu.GEMV()]
