"""Dense layers as pre-packed, register-blocked GEMM kernels.

``y = x @ W (+ bias) (-> GELU)`` with ``W`` a compile-time constant ``[K, N]``.
The weight is re-laid out once, at build time, as ``Wp[N // nb, K, nb]``: a
micro-kernel then streams one contiguous ``nb``-wide row of a panel per ``k``
while ``mr x nb`` accumulators stay in vector registers.

Schedule (per output tile ``mr x nb``, tiles in parallel over cores)::

    for tile in parallel(N/nb x M/mr):    # panel-major: a Wp panel stays in L2
        acc[mr, nb] = 0                   # registers
        for k in K:
            for i in unroll(mr):
                acc[i, :] += A[i, k] * Wp[tile, k, :]   # broadcast-FMA, nb lanes
        C[tile] = epilogue(acc)           # bias, GELU fused into the write-back

``nb`` is two vector registers wide (32 fp32 lanes with AVX-512, 16 with
AVX2, 8 with NEON), ``mr`` is 8 rows with 32 registers (AVX-512, NEON) and 4
with AVX2's 16, so that ``mr * nb / lanes`` accumulators plus loads fit the
register file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canao.compiler.schedules.vector_math import gelu_expr, gelu_poly

EPILOGUES = ("none", "bias", "bias_gelu")


@dataclass(frozen=True)
class DenseTiling:
    mr: int  # rows of the register tile
    nb: int  # columns of the register tile = width of a packed weight panel

    def packs(self, n: int) -> bool:
        """Whole panels, or more than one panel (the last one is padded with zero columns).

        A product narrower than one panel (a classifier's 2 outputs) is left to
        the generic path: padding it would be mostly wasted work.
        """
        return n % self.nb == 0 or n > self.nb

    def padded(self, n: int) -> int:
        return -(-n // self.nb) * self.nb


# fp32 lanes by the widest SIMD extension the x86 target's CPU has. TVM 0.27's
# llvm_get_vector_width answers 512 for every x86 CPU (haswell, znver3, even x86-64), so
# AVX2 machines were tiled for AVX-512: 32 accumulators in 16 registers, half the speed.
_X86_LANES = (("avx512f", 16), ("avx", 8))


def vector_lanes(target: object) -> int:
    """fp32 lanes of the target's widest SIMD register (16 AVX-512, 8 AVX/AVX2, 4 NEON/SSE)."""
    from tvm.target.codegen import llvm_cpu_has_features, llvm_get_vector_width

    if is_aarch64(target):
        return 4  # NEON's 128 bits (SVE is not used)
    if getattr(getattr(target, "kind", None), "name", "llvm") == "llvm":
        for feature, lanes in _X86_LANES:
            if llvm_cpu_has_features([feature], target):
                return lanes
        return 4  # SSE
    bits = llvm_get_vector_width(target)
    return max(bits // 32, 4) if bits > 0 else 4


def choose_tiling(target: object) -> DenseTiling:
    """``mr x nb``: nb two vectors wide; mr 8 rows with 32 vector registers. With AVX2's 16,
    4 rows (8 accumulators): 6 rows fit on paper, but measured side by side on an AVX2 EPYC
    (Zen 3, 1 thread) 6 x 16 ran at 46-71 GFLOPS and 4 x 16 at 89-92 (BERT's M = 128 is not
    whole 6-row tiles either)."""
    lanes = vector_lanes(target)
    registers = 32 if lanes >= 16 or is_aarch64(target) else 16
    nb = 2 * lanes
    mr = 8 if registers == 32 else 4
    return DenseTiling(mr=mr, nb=nb)


def is_aarch64(target: object) -> bool:
    return "aarch64" in str(getattr(target, "attrs", {}).get("mtriple", ""))


def pack_weight(weight: np.ndarray, nb: int) -> np.ndarray:
    """``W[K, N] -> Wp[N // nb, K, nb]`` (contiguous panels of ``nb`` output columns)."""
    k, n = weight.shape
    if n % nb:
        raise ValueError(f"N={n} is not a multiple of the panel width {nb}")
    return np.ascontiguousarray(weight.reshape(k, n // nb, nb).transpose(1, 0, 2))


def dense_primfunc(
    m: int, k: int, n: int, epilogue: str, tiling: DenseTiling, approximate: bool = False
) -> object:
    """The scheduled TIR kernel for one dense shape and epilogue (``approximate``: I-BERT GELU)."""
    from tvm import s_tir, te

    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
    nb = tiling.nb
    a = te.placeholder((m, k), "float32", name="A")
    wp = te.placeholder((n // nb, k, nb), "float32", name="Wp")
    r = te.reduce_axis((0, k), name="k")
    out = te.compute(
        (m, n), lambda i, j: te.sum(a[i, r] * wp[j // nb, r, j % nb], axis=r), name="gemm"
    )
    args = [a, wp]
    epilogue_blocks = []
    if epilogue in ("bias", "bias_gelu"):
        bias = te.placeholder((n,), "float32", name="bias")
        args.append(bias)
        gemm = out
        out = te.compute((m, n), lambda i, j: gemm[i, j] + bias[j], name="bias_add")
        epilogue_blocks.append("bias_add")
    if epilogue == "bias_gelu":
        pre = out
        gelu = gelu_poly if approximate else gelu_expr
        out = te.compute((m, n), lambda i, j: gelu(pre[i, j]), name="gelu")
        epilogue_blocks.append("gelu")
    func = te.create_prim_func([*args, out])
    sch = s_tir.Schedule(func)
    _schedule(sch, tiling, epilogue_blocks)
    # Opaque: FuseOps must not merge this scheduled kernel with its neighbours
    # (FuseTIR would rebuild it without the schedule).
    return sch.mod["main"].with_attrs(
        {"op_pattern": 8, "tirx.is_scheduled": True, "canao.flops": 2 * m * k * n}
    )


def _schedule(sch: object, tiling: DenseTiling, epilogue_blocks: list[str]) -> None:
    gemm = sch.get_sblock("gemm")
    i, j, r = sch.get_loops(gemm)
    j_tile, j_lane = sch.split(j, [None, tiling.nb])
    i_tile, i_row = sch.split(i, [None, tiling.mr])
    sch.reorder(j_tile, i_tile, r, i_row, j_lane)
    tile = sch.fuse(j_tile, i_tile)
    sch.parallel(tile)
    sch.vectorize(j_lane)
    sch.unroll(i_row)
    acc = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(acc, tile)
    for name in epilogue_blocks:
        sch.reverse_compute_inline(sch.get_sblock(name))
    sch.vectorize(sch.get_loops(acc)[-1])
    init = sch.decompose_reduction(gemm, r)
    sch.vectorize(sch.get_loops(init)[-1])
