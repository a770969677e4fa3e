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

The micro-kernel is chosen from the target's features (:func:`int8_tiling`, :data:`ISAS`):
AVX-512 VNNI (``vpdpbusd`` on zmm, 16 lanes), AVX-VNNI (``vpdpbusd`` on ymm, 8 lanes),
aarch64 i8mm (``usdot``, 4 lanes, uint8 x int8), aarch64 dotprod (``sdot``, 4 lanes: signed
x signed, so activations are stored as ``qa - 128`` and the zero-point term uses
``za - 128``, the same integers), AVX2 without VNNI (by default ``vpmaddubsw`` on 7-bit
activations, 0..127 as FBGEMM's ``reduce_range``, then ``vpmaddwd`` by ones; with
``full_range``, ``vpmaddwd`` on activations stored as int16 and weights widened from int8 in
the register), and, on NEON without dotprod, plain widening multiply-adds that LLVM
vectorises: correct, slower. Every path but AVX2's 7-bit one computes the same integers
(that one quantizes activations to 127 levels instead of 255, and its PyTorch reference
does the same); the weights' packing follows the lane count and the instruction's group of
k (4, or 2 for ``vpmaddwd``), ``Wq[N // lanes, Kp // group, lanes, group]``, int8 on every
path.

An activation is scaled by the row's reciprocal scale ``1 / sa`` (one IEEE division per row;
a division per element was 40% of the quantizer's time) and rounded half to even
(``nearbyint``, one rounding step that LLVM cannot contract into a multiply-add; as
XNNPACK's ``lrintf``). The zero point and the weights round as ``floor(v + 0.5)``. The
PyTorch reference (:func:`reference_dense`) does exactly the same, so the two agree to float
rounding of the final scale.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from canao.compiler.schedules.vector_math import gelu_expr

EPILOGUES = ("none", "bias", "bias_gelu")
GROUP = 4  # K is padded to a multiple of this (the 8-bit dot instructions' group of k)
QUANTIZED_DTYPES = ("uint8", "int8", "int16")
SIGNED_SHIFT = 128  # signed-activation paths store qa - 128 (sdot multiplies int8 x int8)
LONG_REDUCTION = 768  # from this K on, AVX-512 VNNI dense layers use the 8 x 48 tile


@dataclass(frozen=True)
class Int8Isa:
    """One int8 dot-product micro-kernel: what it runs on and how it is called."""

    name: str
    lanes: int  # int32 accumulators per vector register
    intrinsic: str | None  # LLVM dot-product intrinsic; None: widening multiply-adds
    activation_dtype: str  # what the quantize kernel stores: uint8, int8 (qa - 128), int16
    panels: int  # lanes-wide column panels per register tile (mr x panels accumulators)
    requires: str  # for messages: the CPU feature it is chosen by
    group: int = 4  # k values one lane sums per instruction (the packing's innermost axis)
    accumulates: bool = True  # the intrinsic adds into its first operand (else: add after)
    # The activations' top level: 255 (uint8), or 127 where the dot instruction would
    # saturate on full-range uint8 (AVX2's vpmaddubsw sums two uint8 x int8 products in int16).
    levels: int = 255


ISAS: dict[str, Int8Isa] = {
    isa.name: isa
    for isa in (
        Int8Isa("avx512-vnni", 16, "llvm.x86.avx512.vpdpbusd.512", "uint8", 4, "avx512vnni"),
        # LLVM names the VEX (AVX-VNNI) and EVEX-256 forms alike; the target's features pick.
        Int8Isa("avx-vnni", 8, "llvm.x86.avx512.vpdpbusd.256", "uint8", 2, "avxvnni"),
        # i8mm's usdot multiplies uint8 x int8 as vpdpbusd does: no shifted activations.
        Int8Isa("neon-i8mm", 4, "llvm.aarch64.neon.usdot.v4i32.v16i8", "uint8", 4, "i8mm"),
        Int8Isa("neon-dot", 4, "llvm.aarch64.neon.sdot.v4i32.v16i8", "int8", 4, "dotprod"),
        # AVX2 has no 8-bit dot product that is exact on full-range uint8 x int8 (pmaddubsw
        # saturates), so activations are stored as int16 (0..255), int8 weights are widened
        # in registers, and vpmaddwd sums pairs of int16 products into int32, as XNNPACK's
        # AVX2 QD8 kernels do. 2 x 2 panels: 8 accumulators, the weights loaded once per
        # pair of k and used by all four rows.
        Int8Isa(
            "avx2", 8, "llvm.x86.avx2.pmadd.wd", "int16", 2, "avx2", group=2, accumulates=False
        ),
        # AVX2 with 7-bit activations (0..127), as FBGEMM's ``reduce_range`` on CPUs without
        # VNNI: vpmaddubsw's pair of uint7 x int8 products (at most 2 * 127 * 127 = 32258)
        # cannot saturate int16, so it is exact, then vpmaddwd by ones sums pairs into int32.
        # Three instructions per 4 k (vpmaddubsw, vpmaddwd, vpaddd) against four (two
        # vpmaddwd, two vpaddd) and no widening of weights: 1.3x the "avx2" kernel, at half
        # the activation resolution. The default on AVX2 hosts (int8_isa); "avx2" is the
        # full-range choice (pipeline fast-int8-full-range).
        Int8Isa(
            "avx2-u7",
            8,
            "llvm.x86.avx2.pmadd.ub.sw",
            "uint8",
            2,
            "avx2",
            accumulates=False,
            levels=127,
        ),
        Int8Isa("neon", 4, None, "uint8", 2, "neon"),
    )
}


@dataclass(frozen=True)
class Int8Tiling:
    mr: int = 4  # rows of the register tile
    panels: int = 4  # lanes-wide column panels per tile: the tile is mr x (panels * lanes)
    isa: str = "avx512-vnni"

    def __post_init__(self) -> None:
        if self.isa not in ISAS:
            raise ValueError(f"unknown int8 ISA {self.isa!r}; expected one of {', '.join(ISAS)}")

    @classmethod
    def for_isa(cls, isa: str) -> Int8Tiling:
        return cls(panels=ISAS[isa].panels, isa=isa) if isa in ISAS else cls(isa=isa)

    def for_shape(self, m: int, kp: int) -> Int8Tiling:
        """The register tile for an ``m x kp`` activation: on AVX-512 VNNI, 8 x 48 (24
        accumulators) where the reduction is long enough to pay for its larger write-back.

        Measured side by side at 1 thread (benchmarks/int8.py shapes): 8 x 48 against 4 x 64
        was +3 to +6% at K of 768 or more (BERT-base's FFN and QKV layers), -6 to 0% at
        K = 384 (MiniLM's). The weights' packing depends on the lanes only, so it is the same.
        """
        if self.isa == "avx512-vnni" and kp >= LONG_REDUCTION and m % 8 == 0:
            return Int8Tiling(mr=8, panels=3, isa=self.isa)
        return self

    @property
    def spec(self) -> Int8Isa:
        return ISAS[self.isa]

    @property
    def lanes(self) -> int:
        return self.spec.lanes

    @property
    def group(self) -> int:
        return self.spec.group

    @property
    def nb(self) -> int:
        return self.panels * self.lanes

    @property
    def signed(self) -> bool:
        return self.spec.activation_dtype == "int8"


def int8_isa(target: object, full_range: bool = False) -> str:
    """The fastest int8 micro-kernel ``target``'s CPU features allow; with ``full_range``,
    the fastest with 8-bit activations (on AVX2 without VNNI: "avx2", not "avx2-u7")."""
    from tvm.target.codegen import llvm_cpu_has_features

    from canao.errors import UnknownPipelineError

    def has(feature: str) -> bool:
        return bool(llvm_cpu_has_features([feature], target))

    attrs = getattr(target, "attrs", {})
    if "aarch64" in str(attrs.get("mtriple", "")):
        return next((isa for isa in ("neon-i8mm", "neon-dot") if has(ISAS[isa].requires)), "neon")
    for isa in ("avx512-vnni", "avx-vnni", "avx2" if full_range else "avx2-u7"):
        if has(ISAS[isa].requires):
            return isa
    raise UnknownPipelineError(
        "int8 builds need AVX2, AVX-VNNI, AVX-512 VNNI or aarch64 NEON; this target's CPU "
        f"({attrs.get('mcpu', '?')}) has none of them"
    )


def int8_tiling(target: object, full_range: bool = False) -> Int8Tiling:
    """The int8 register tile for ``target``; one clear error where there is no int8 path."""
    return Int8Tiling.for_isa(int8_isa(target, full_range))


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


def pack_int8_weight(qw: np.ndarray, tiling: Int8Tiling) -> np.ndarray:
    """``qw[K, N] -> Wq[N // lanes, Kp // group, lanes, group]`` (N a multiple of the tile
    width, K padded with 0 to a multiple of 4)."""
    k, n = qw.shape
    if n % tiling.nb:
        raise ValueError(f"N={n} is not a multiple of the tile width {tiling.nb}")
    kp, lanes, group = padded(k, GROUP), tiling.lanes, tiling.group
    full = np.zeros((kp, n), np.int8)
    full[:k] = qw
    return np.ascontiguousarray(
        full.reshape(kp // group, group, n // lanes, lanes).transpose(2, 0, 3, 1)
    )


# ---- the PyTorch reference of exactly this scheme ----


def quantize_rows(x: np.ndarray | object, levels: int = 255) -> tuple[object, object, object]:
    """Per-row asymmetric uint8 (0..``levels``) of a float32 torch tensor ``[M, K]``: (qa,
    sa, za)."""
    import torch

    lo = torch.clamp(x.amin(dim=-1), max=0.0)  # type: ignore[union-attr]
    hi = torch.clamp(x.amax(dim=-1), min=0.0)  # type: ignore[union-attr]
    scale = torch.where(hi > lo, (hi - lo) / float(levels), torch.ones_like(hi))
    zero = torch.clamp(torch.floor(-lo / scale + 0.5), 0, levels)
    inverse = 1.0 / scale
    q = torch.clamp(torch.round(x * inverse[:, None]) + zero[:, None], 0, levels)  # half to even
    return q, scale, zero


def reference_dense(
    x: object,
    qw: np.ndarray,
    sw: np.ndarray,
    bias: np.ndarray | None,
    epilogue: str,
    levels: int = 255,
) -> object:
    """What the compiled kernel computes, in PyTorch (float64 for the exact integer sums)."""
    import torch

    q, scale, zero = quantize_rows(x, levels)
    w = torch.from_numpy(qw.astype(np.float64))
    acc = q.double() @ w - zero.double()[:, None] * w.sum(0)[None, :]  # type: ignore[union-attr]
    y = acc.float() * (scale[:, None] * torch.from_numpy(sw)[None, :])  # type: ignore[index]
    if bias is not None:
        y = y + torch.from_numpy(bias)
    if epilogue == "bias_gelu":
        y = torch.nn.functional.gelu(y)
    return y


# ---- the TIR kernels ----


def _register_dot(isa: Int8Isa) -> str:
    """``C[lanes] += A[group] . B[lanes, group]`` on ``isa``'s dot-product instruction.

    The operands are passed as LLVM 22 declares them (``<group * lanes x i8>``, or ``i16``
    for ``vpmaddwd``): TVM 0.27's own ``dot_16x4_vnni`` passes ``int32x16`` and fails LLVM's
    verifier. ``A``'s group (32 bits) is broadcast to every lane (one row of activations
    against ``lanes`` columns). ``vpmaddwd`` takes int16 weights: the int8 ones are widened
    in the register (``vpmovsxbw``), so the packed weights stay int8 on every path.
    ``vpmaddubsw`` (group 4, not accumulating) leaves int16 sums of pairs, which
    ``vpmaddwd`` by ones adds into int32.
    """
    from tvm.s_tir import TensorIntrin
    from tvm.script import tirx as T

    assert isa.intrinsic is not None
    lanes, group, a_dtype, intrinsic = isa.lanes, isa.group, isa.activation_dtype, isa.intrinsic
    name = f"canao_dot_{lanes}x{group}_{isa.name}"
    try:
        TensorIntrin.get(name)
        return name
    except Exception:
        pass
    width = lanes * group
    # vpmaddwd multiplies int16 x int16; every 8-bit instruction takes bytes.
    operand = "int16" if group == 2 else a_dtype

    # The accumulators are a register tile (scope "local"), which TVM's own description
    # (scope "global") does not match.
    @T.prim_func(s_tir=True)
    def desc(
        A: T.Buffer((group,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, group), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            for i in T.serial(0, lanes):
                for k in T.serial(0, group):
                    with T.sblock("update"):
                        vi, vk = T.axis.remap("SR", [i, k])
                        C[vi] = C[vi] + T.cast(A[vk], "int32") * T.cast(B[vi, vk], "int32")

    def updated(A: T.Buffer, B: T.Buffer, C: T.Buffer) -> object:
        """``C`` after one instruction, as one expression: no let-bound temporaries, which
        TVM 0.27 turns into buffers allocated from the workspace pool on every call."""
        row = T.reinterpret(A.vload([0], f"{a_dtype}x{group}"), dtype="int32")
        a = T.reinterpret(T.broadcast(row, lanes), dtype=f"{operand}x{width}")
        b = B.vload([0, 0], dtype=f"int8x{width}")
        acc, lookup = C.vload([0], dtype=f"int32x{lanes}"), T.llvm_lookup_intrinsic_id(intrinsic)
        if isa.accumulates:  # vpdpbusd, sdot, usdot add into their first operand
            return T.call_llvm_pure_intrin(lookup, acc, a, b, dtype=f"int32x{lanes}")
        if group == 2:  # vpmaddwd on weights widened to int16, then add
            widened = b.astype(f"int16x{width}")
            return acc + T.call_llvm_pure_intrin(lookup, a, widened, dtype=f"int32x{lanes}")
        pairs = T.call_llvm_pure_intrin(lookup, a, b, dtype=f"int16x{2 * lanes}")  # vpmaddubsw
        widen = T.llvm_lookup_intrinsic_id("llvm.x86.avx2.pmadd.wd")
        ones = T.broadcast(T.int16(1), 2 * lanes)
        return acc + T.call_llvm_pure_intrin(widen, pairs, ones, dtype=f"int32x{lanes}")

    @T.prim_func(s_tir=True)
    def impl(
        A: T.Buffer((group,), a_dtype, offset_factor=1),
        B: T.Buffer((lanes, group), "int8", offset_factor=1),
        C: T.Buffer((lanes,), "int32", offset_factor=1, scope="local"),
    ) -> None:
        with T.sblock("root"):
            T.reads(C[0:lanes], A[0:group], B[0:lanes, 0:group])
            T.writes(C[0:lanes])
            C[T.ramp(T.int32(0), 1, lanes)] = updated(A, B, C)

    TensorIntrin.register(name, desc, impl)
    return name


def quantize_primfunc(m: int, k: int, dtype: str = "uint8", levels: int = 255) -> object:
    """``x[M, K]`` fp32 -> (``qa[M, Kp]`` in ``dtype``, ``sa[M]`` fp32, ``za[M]`` fp32 integer).

    ``dtype`` is the ISA's ``activation_dtype``: uint8, int8 (stored as ``qa - 128``, for
    sdot) or int16 (the same 0..255 values, for vpmaddwd); ``levels`` its top level (255, or
    127 for AVX2's vpmaddubsw). Padding stays 0 either way (it multiplies zero weight rows).
    """
    if dtype not in QUANTIZED_DTYPES:
        raise ValueError(f"activation dtype {dtype!r}: expected one of {QUANTIZED_DTYPES}")
    signed = dtype == "int8"
    from tvm import s_tir, te, tirx

    kp = padded(k, GROUP)
    x = te.placeholder((m, k), "float32", name="x")
    lo, hi = _row_min_max(x, m, k)
    zero_f, one = tirx.const(0.0, "float32"), tirx.const(1.0, "float32")
    half, top = tirx.const(0.5, "float32"), tirx.const(float(levels), "float32")

    def scale_of(i: object) -> object:
        low, high = te.min(lo[i], zero_f), te.max(hi[i], zero_f)
        return tirx.Select(high > low, (high - low) / top, one)

    scale = te.compute((m,), scale_of, name="sa")
    zero_point = te.compute(
        (m,),
        lambda i: te.max(te.min(te.floor(-te.min(lo[i], zero_f) / scale[i] + half), top), zero_f),
        name="zf",
    )
    inverse = te.compute((m,), lambda i: one / scale[i], name="inv")
    shift = tirx.const(SIGNED_SHIFT if signed else 0, "float32")
    qa = te.compute(
        (m, kp),
        lambda i, j: tirx.if_then_else(
            j < k,
            (
                te.max(
                    te.min(
                        tirx.nearbyint(x[i, te.min(j, k - 1)] * inverse[i]) + zero_point[i],
                        top,
                    ),
                    zero_f,
                )
                - shift
            ).astype(dtype),
            tirx.const(0, dtype),
        ),
        name="qa",
    )
    # The zero point leaves as float32 (an exact integer 0..255): an int32 copy would be a
    # second consumer outside the row loop, and the GEMM's write-back casts it for free.
    func = te.create_prim_func([x, qa, scale, zero_point])
    sch = s_tir.Schedule(func)
    # One row at a time through every stage (its min, max, scale, zero point, bytes): the
    # row is read from memory once, then from L1. Stage by stage over all rows, a BERT-base
    # FFN activation (128 x 3072 floats, 1.5 MB) went through L2 three times. (sa and zf
    # are outputs, which compute_at cannot move; merging the row loops can.)
    lanes = ("lane_min", "lane_max") if k % MINMAX_LANES == 0 else ()
    stages = (*lanes, "row_min", "row_max", "sa", "zf", "inv", "qa")
    row = sch.merge(*(sch.get_loops(sch.get_sblock(name))[0] for name in stages))
    sch.parallel(row)
    for name in lanes:
        _vectorise_lanes(sch, sch.get_sblock(name))
    sch.vectorize(sch.get_loops(sch.get_sblock("qa"))[-1])
    return sch.mod["main"].with_attrs({"op_pattern": 8, "tirx.is_scheduled": True})


# A row's min and max are taken over this many lanes at once, then across the lanes.
MINMAX_LANES = 16


def _row_min_max(x: object, m: int, k: int) -> tuple[object, object]:
    """Per-row min and max of ``x[M, K]`` in two steps: lane-wise over the row, then across.

    A plain reduction is a serial chain of scalar compares: quantizing a 128 x 1536
    activation took 302 us, 66 us with lanes (128 x 384: 57 -> 14 us). A K that is not a
    whole number of lanes (none of the search space's sizes) keeps the plain reduction.
    """
    from tvm import te

    lanes, chunks = MINMAX_LANES, k // MINMAX_LANES
    if k % lanes:
        r1, r2 = te.reduce_axis((0, k), name="r1"), te.reduce_axis((0, k), name="r2")
        lo = te.compute((m,), lambda i: te.min(x[i, r1], axis=r1), name="row_min")  # type: ignore[index]
        hi = te.compute((m,), lambda i: te.max(x[i, r2], axis=r2), name="row_max")  # type: ignore[index]
        return lo, hi

    def element(i: object, chunk: object, lane: object) -> object:
        return x[i, chunk * lanes + lane]  # type: ignore[index]

    c1, c2 = te.reduce_axis((0, chunks), name="c1"), te.reduce_axis((0, chunks), name="c2")
    lane_min = te.compute(
        (m, lanes), lambda i, lane: te.min(element(i, c1, lane), axis=c1), name="lane_min"
    )
    lane_max = te.compute(
        (m, lanes), lambda i, lane: te.max(element(i, c2, lane), axis=c2), name="lane_max"
    )
    l1, l2 = te.reduce_axis((0, lanes), name="l1"), te.reduce_axis((0, lanes), name="l2")
    lo = te.compute((m,), lambda i: te.min(lane_min[i, l1], axis=l1), name="row_min")
    hi = te.compute((m,), lambda i: te.max(lane_max[i, l2], axis=l2), name="row_max")
    return lo, hi


def _vectorise_lanes(sch: object, block: object) -> None:
    """Chunks outer, lanes inner and vectorised (before the init is split off: TVM
    vectorises a loop of a reduction block, not of a bare update)."""
    _row, lane, chunk = sch.get_loops(block)  # type: ignore[attr-defined]
    sch.reorder(chunk, lane)  # type: ignore[attr-defined]
    sch.vectorize(lane)  # type: ignore[attr-defined]
    init = sch.decompose_reduction(block, chunk)  # type: ignore[attr-defined]
    sch.vectorize(sch.get_loops(init)[-1])  # type: ignore[attr-defined]


def dense_int8_primfunc(m: int, kp: int, n: int, epilogue: str, tiling: Int8Tiling) -> object:
    """``y[M, N]`` from ``qa, sa, za`` and the packed ``Wq``, column sums, scales (+ bias)."""
    from tvm import s_tir, te

    if epilogue not in EPILOGUES:
        raise ValueError(f"unknown epilogue {epilogue!r}; expected one of {EPILOGUES}")
    if kp % GROUP or n % tiling.nb:
        raise ValueError(f"K={kp} must be a multiple of {GROUP}, N={n} of {tiling.nb}")
    group = tiling.group
    lanes = tiling.lanes
    qa = te.placeholder((m, kp), tiling.spec.activation_dtype, name="qa")
    sa = te.placeholder((m,), "float32", name="sa")
    za = te.placeholder((m,), "float32", name="za")
    wq = te.placeholder((n // lanes, kp // group, lanes, group), "int8", name="Wq")
    cs = te.placeholder((n,), "int32", name="colsum")
    sw = te.placeholder((n,), "float32", name="sw")
    r = te.reduce_axis((0, kp), name="k")
    acc = te.compute(
        (m, n),
        lambda i, j: te.sum(
            qa[i, r].astype("int32")
            * wq[j // lanes, r // group, j % lanes, r % group].astype("int32"),
            axis=r,
        ),
        name="gemm",
    )
    args = [qa, sa, za, wq, cs, sw]
    # Stored activations qa - 128 sum to acc - 128 cs: the zero point absorbs the shift.
    shift = SIGNED_SHIFT if tiling.signed else 0
    out = te.compute(
        (m, n),
        lambda i, j: (
            (acc[i, j] - (za[i].astype("int32") - shift) * cs[j]).astype("float32")
            * (sa[i] * sw[j])
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
    gemm = sch.get_sblock("gemm")
    i, j, r = sch.get_loops(gemm)
    j_tile, j_panel, j_lane = sch.split(j, [None, tiling.panels, tiling.lanes])
    mr = tiling.mr if m % tiling.mr == 0 else 1  # an odd M (a pooled row) runs row by row
    i_tile, i_row = sch.split(i, [None, mr])
    r_group, r_lane = sch.split(r, [None, tiling.group])
    dot = tiling.spec.intrinsic is not None
    # A dot instruction takes the lanes x 4 block whole; without one, each of the 4 products
    # of a group is one vector multiply-add over the lanes (so the lanes go innermost).
    inner = (j_lane, r_lane) if dot else (r_lane, j_lane)
    sch.reorder(j_tile, i_tile, r_group, i_row, j_panel, *inner)
    tile = sch.fuse(j_tile, i_tile)
    sch.parallel(tile)
    acc = sch.cache_write(gemm, 0, "local")
    sch.reverse_compute_at(acc, tile)
    for name in epilogue_blocks:
        sch.reverse_compute_inline(sch.get_sblock(name))
    sch.vectorize(sch.get_loops(acc)[-1])
    if not dot:
        # Widening multiply-adds over whole vectors of columns (pmulld; smull on NEON). The
        # lanes are vectorised while the block still holds its init: TVM vectorises a loop
        # over a reduction block, not over a bare update.
        sch.unroll(r_lane)
        sch.vectorize(j_lane)
    init = sch.decompose_reduction(gemm, r_group)
    sch.vectorize(sch.get_loops(init)[-1])
    sch.unroll(i_row)
    sch.unroll(j_panel)
    if dot:
        sch.tensorize(j_lane, _register_dot(tiling.spec))
