"""Dynamic-range int8 dense layers: per-token uint8 activations x per-channel int8 weights.

The scheme is XNNPACK's QD8/QDU8 (what LiteRT's dynamic-range int8 runs on x86):

- weights ``W[K, N]``: symmetric per output channel, ``qw = round(W / sw)`` with
  ``sw[n] = max|W[:, n]| / 127``; packed once, at build time, as
  ``Wq[N // 16, Kp // 4, 16, 4]`` (``Kp``: K rounded up to 4, zero rows) with the column
  sums ``cs[n] = sum_k qw[k, n]``;
- activations: asymmetric per row (token) at run time, over the row's range widened to
  hold 0: ``sa = (max - min) / 255``, ``za = round(-min / sa)``, ``qa = clamp(round(x / sa)
  + za, 0, 255)``;
- product: ``acc[m, n] = sum_k qa[m, k] * qw[k, n]`` in int32 (``vpdpbusd``: 4 uint8 x int8
  products per lane per instruction), then ``y = (acc - za[m] * cs[n]) * sa[m] * sw[n] + b[n]``
  and GELU in the write-back, as the fp32 kernel's epilogue.

Rounding is ``floor(v + 0.5)`` everywhere, in the kernel and in the PyTorch reference
(:func:`reference_dense`), so the two agree to float rounding of the final scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canao.compiler.schedules.vector_math import gelu_expr

EPILOGUES = ("none", "bias", "bias_gelu")
LANES = 16  # int32 accumulators per 512-bit register
GROUP = 4  # uint8 x int8 products summed per lane by vpdpbusd
VNNI_INTRIN = "canao_dot_16x4_vnni"


@dataclass(frozen=True)
class Int8Tiling:
    mr: int = 4  # rows of the register tile
    panels: int = 4  # 16-column panels per tile: the tile is mr x 64 accumulators

    @property
    def nb(self) -> int:
        return self.panels * LANES


def int8_tiling(target: object) -> Int8Tiling:
    """The int8 register tile for ``target``; one clear error where there is no VNNI."""
    from tvm.target.codegen import llvm_cpu_has_features

    from canao.errors import UnknownPipelineError

    if not llvm_cpu_has_features(["avx512vnni"], target):
        raise UnknownPipelineError(
            "int8 builds need AVX-512 VNNI (vpdpbusd) for now; this target's CPU "
            f"({getattr(target, 'attrs', {}).get('mcpu', '?')}) has none"
        )
    return Int8Tiling()


def int8_packs(n: int, tiling: Int8Tiling) -> bool:
    """Which dense layers go int8: as the fp32 rule, whole tiles or more than one (a
    classifier's 2 outputs stay fp32, as XNNPACK leaves tiny layers to its fp32 path)."""
    return n % tiling.nb == 0 or n > tiling.nb


def padded(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


# ---- weights, packed at build time ----


def quantize_weight(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``W[K, N]`` -> (int8 ``qw[K, N]``, fp32 per-column scales ``sw[N]``), symmetric."""
    peak = np.abs(weight).max(axis=0).astype(np.float32)
    scale = np.where(peak > 0, peak / np.float32(127.0), np.float32(1.0)).astype(np.float32)
    q = np.floor(weight.astype(np.float32) / scale + np.float32(0.5))
    return np.clip(q, -127, 127).astype(np.int8), scale


def pack_int8_weight(qw: np.ndarray, nb: int) -> np.ndarray:
    """``qw[K, N] -> Wq[N // 16, Kp // 4, 16, 4]`` (N a multiple of ``nb``, K padded with 0)."""
    k, n = qw.shape
    if n % nb:
        raise ValueError(f"N={n} is not a multiple of the tile width {nb}")
    kp = padded(k, GROUP)
    full = np.zeros((kp, n), np.int8)
    full[:k] = qw
    return np.ascontiguousarray(
        full.reshape(kp // GROUP, GROUP, n // LANES, LANES).transpose(2, 0, 3, 1)
    )


# ---- the PyTorch reference of exactly this scheme ----


def quantize_rows(x: np.ndarray | object) -> tuple[object, object, object]:
    """Per-row asymmetric uint8 of a float32 torch tensor ``[M, K]``: (qa, sa, za)."""
    import torch

    lo = torch.clamp(x.amin(dim=-1), max=0.0)  # type: ignore[union-attr]
    hi = torch.clamp(x.amax(dim=-1), min=0.0)  # type: ignore[union-attr]
    scale = torch.where(hi > lo, (hi - lo) / 255.0, torch.ones_like(hi))
    zero = torch.clamp(torch.floor(-lo / scale + 0.5), 0, 255)
    q = torch.clamp(torch.floor(x / scale[:, None] + 0.5) + zero[:, None], 0, 255)
    return q, scale, zero


def reference_dense(
    x: object, qw: np.ndarray, sw: np.ndarray, bias: np.ndarray | None, epilogue: str
) -> object:
    """What the compiled kernel computes, in PyTorch (float64 for the exact integer sums)."""
    import torch

    q, scale, zero = quantize_rows(x)
    w = torch.from_numpy(qw.astype(np.float64))
    acc = q.double() @ w - zero.double()[:, None] * w.sum(0)[None, :]  # type: ignore[union-attr]
    y = acc.float() * (scale[:, None] * torch.from_numpy(sw)[None, :])  # type: ignore[index]
    if bias is not None:
        y = y + torch.from_numpy(bias)
    if epilogue == "bias_gelu":
        y = torch.nn.functional.gelu(y)
    return y


# ---- the TIR kernels ----


def _register_vnni() -> str:
    """``C[16] += A[4] . B[16, 4]`` on ``vpdpbusd``, with the operand types LLVM 22 declares.

    TVM 0.27's own ``dot_16x4_vnni`` passes the operands as ``int32x16``; the wheel's LLVM
    declares ``llvm.x86.avx512.vpdpbusd.512`` with ``<64 x i8>`` ones and rejects the call.
    Reinterpreting them as ``uint8x64`` / ``int8x64`` is the same bits and verifies.
    """
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    try:
        TensorIntrin.get(VNNI_INTRIN)
        return VNNI_INTRIN
    except Exception:
        pass

    # The accumulators are a register tile (scope "local"), which TVM's own description
    # (scope "global") does not match.
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            for i in T.serial(0, 16):
                for k in T.serial(0, 4):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    @T.prim_func(s_tir=True)
    def vnni(
        A: T.Buffer((4,), "uint8", offset_factor=1),
        B: T.Buffer((16, 4), "int8", offset_factor=1),
        C: T.Buffer((16,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:16], A[0:4], B[0:16, 0:4])
            T.writes(C[0:16])
            a_i32 = T.reinterpret(A.vload([0], "uint8x4"), dtype="int32")
            a_u8x64 = T.reinterpret(T.broadcast(a_i32, 16), dtype="uint8x64")
            b_i8x64 = B.vload([0, 0], dtype="int8x64")
            C[T.ramp(T.int32(0), 1, 16)] = T.call_llvm_pure_intrin(
                T.llvm_lookup_intrinsic_id("llvm.x86.avx512.vpdpbusd.512"),
                C.vload([0], dtype="int32x16"),
                a_u8x64,
                b_i8x64,
                dtype="int32x16",
            )

    TensorIntrin.register(VNNI_INTRIN, desc, vnni)
    return VNNI_INTRIN


def quantize_primfunc(m: int, k: int) -> object:
    """``x[M, K]`` fp32 -> (``qa[M, Kp]`` uint8, ``sa[M]`` fp32, ``za[M]`` fp32 integer)."""
    from tvm import s_tir, te, tirx

    kp = padded(k, GROUP)
    x = te.placeholder((m, k), "float32", name="x")
    r = te.reduce_axis((0, k), name="r")
    lo = te.compute((m,), lambda i: te.min(x[i, r], axis=r), name="row_min")
    r2 = te.reduce_axis((0, k), name="r2")
    hi = te.compute((m,), lambda i: te.max(x[i, r2], axis=r2), name="row_max")
    zero_f, one = tirx.const(0.0, "float32"), tirx.const(1.0, "float32")
    half = tirx.const(0.5, "float32")

    def scale_of(i: object) -> object:
        low, high = te.min(lo[i], zero_f), te.max(hi[i], zero_f)
        return tirx.Select(high > low, (high - low) / tirx.const(255.0, "float32"), one)

    scale = te.compute((m,), scale_of, name="sa")
    zero_point = te.compute(
        (m,),
        lambda i: te.max(te.min(te.floor(-te.min(lo[i], zero_f) / scale[i] + half), 255.0), zero_f),
        name="zf",
    )
    qa = te.compute(
        (m, kp),
        lambda i, j: tirx.if_then_else(
            j < k,
            te.max(
                te.min(te.floor(x[i, te.min(j, k - 1)] / scale[i] + half) + zero_point[i], 255.0),
                zero_f,
            ).astype("uint8"),
            tirx.const(0, "uint8"),
        ),
        name="qa",
    )
    # The zero point leaves as float32 (an exact integer 0..255): an int32 copy would be a
    # second consumer outside the row loop, and the GEMM's write-back casts it for free.
    func = te.create_prim_func([x, qa, scale, zero_point])
    sch = s_tir.Schedule(func)
    # Each stage is its own pass over the rows (a row's min, max, then its bytes): the
    # activation is M x K floats, a few hundred KB, against the GEMM's M x K x N work.
    for name in ("row_min", "row_max", "sa", "zf", "qa"):
        loops = sch.get_loops(sch.get_sblock(name))
        sch.parallel(loops[0])
    sch.vectorize(sch.get_loops(sch.get_sblock("qa"))[-1])
    return sch.mod["main"].with_attrs({"op_pattern": 8, "tirx.is_scheduled": True})


def dense_int8_primfunc(
    m: int, kp: int, n: int, epilogue: str, tiling: Int8Tiling, k_wrap: int | None = None
) -> object:
    """``y[M, N]`` from ``qa, sa, za`` and the packed ``Wq``, column sums, scales (+ bias).

    ``k_wrap`` (benchmarks only): operands hold ``k_wrap`` of the ``kp`` reduction steps and
    are read modulo it, so a long reduction runs from L1: the micro-kernel's peak.
    """
    from tvm import s_tir, te

    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
    if kp % GROUP or n % tiling.nb:
        raise ValueError(f"K={kp} must be a multiple of {GROUP}, N={n} of {tiling.nb}")
    held = k_wrap or kp
    qa = te.placeholder((m, held), "uint8", name="qa")
    sa = te.placeholder((m,), "float32", name="sa")
    za = te.placeholder((m,), "float32", name="za")
    wq = te.placeholder((n // LANES, held // GROUP, LANES, GROUP), "int8", name="Wq")
    cs = te.placeholder((n,), "int32", name="colsum")
    sw = te.placeholder((n,), "float32", name="sw")
    r = te.reduce_axis((0, kp), name="k")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(
            qa[i, r % held].astype("int32")
            * wq[j // LANES, (r // GROUP) % (held // GROUP), j % LANES, r % GROUP].astype("int32"),
            axis=r,
        ),
        name="gemm",
    )
    args = [qa, sa, za, wq, cs, sw]
    out = te.compute(
        (m, n),
        lambda i, j: (
            (acc[i, j] - za[i].astype("int32") * cs[j]).astype("float32") * (sa[i] * sw[j])
        ),
        name="dequant",
    )
    epilogue_blocks = ["dequant"]
    if epilogue in ("bias", "bias_gelu"):
        bias = te.placeholder((n,), "float32", name="bias")
        args.append(bias)
        pre = out
        out = te.compute((m, n), lambda i, j: pre[i, j] + bias[j], name="bias_add")
        epilogue_blocks.append("bias_add")
    if epilogue == "bias_gelu":
        pre_gelu = out
        out = te.compute((m, n), lambda i, j: gelu_expr(pre_gelu[i, j]), name="gelu")
        epilogue_blocks.append("gelu")
    func = te.create_prim_func([*args, out])
    sch = s_tir.Schedule(func)
    _schedule(sch, m, tiling, epilogue_blocks)
    return sch.mod["main"].with_attrs(
        {"op_pattern": 8, "tirx.is_scheduled": True, "canao.flops": 2 * m * kp * n}
    )


def _schedule(sch: object, m: int, tiling: Int8Tiling, epilogue_blocks: list[str]) -> None:
    intrin = _register_vnni()
    gemm = sch.get_sblock("gemm")
    i, j, r = sch.get_loops(gemm)
    j_tile, j_panel, j_lane = sch.split(j, [None, tiling.panels, LANES])
    mr = tiling.mr if m % tiling.mr == 0 else 1  # an odd M (a pooled row) runs row by row
    i_tile, i_row = sch.split(i, [None, mr])
    r_group, r_lane = sch.split(r, [None, GROUP])
    sch.reorder(j_tile, i_tile, r_group, i_row, j_panel, j_lane, r_lane)
    tile = sch.fuse(j_tile, i_tile)
    sch.parallel(tile)
    acc = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(acc, tile)
    for name in epilogue_blocks:
        sch.reverse_compute_inline(sch.get_sblock(name))
    sch.vectorize(sch.get_loops(acc)[-1])
    init = sch.decompose_reduction(gemm, r_group)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(i_row)
    sch.unroll(j_panel)
    sch.tensorize(j_lane, intrin)
