"""Multi-head attention as one kernel, read straight from the Q/K/V projection.

BERT's attention, as exported, is nine kernels per layer: three head-split
transposes, ``Q K^T``, the mask add, softmax, the fully-masked-row guard of
PyTorch's SDPA, ``P V`` and the head-merge transpose, with a ``[H, S, S]``
score tensor and four transposed copies written to memory in between. This
kernel does all of it per ``(batch, head)``, with scores living in a
``mr x S`` scratch row block that stays in L1::

    for bh in parallel(B * H):
        Kt[D, S] = K[b, :, h, :]^T                      # once per head, L1
        for rows in S / mr:
            s[mr, S] = Q[rows] @ Kt + mask               # register tiles mr x nb
            m = rowmax(s); s = exp(s - m); l = rowsum(s)  # vectorised, float32-exact exp
            out[rows, h, :] = (s @ V[:, h, :]) / l        # register tile mr x D

Q, K and V are read in place from their (merged) projection output, so the
head-split transposes disappear, and the output is written token-major
``[B, S, H, D]``, which is the next dense layer's input as it is.

Exact algebra, not an approximation: ``softmax(s) @ V = (exp(s - m) @ V) / l``
(the division distributes over the sum), so results differ from the unfused
graph only in float rounding. A row whose every score is ``-inf`` gives zeros,
as PyTorch's SDPA guard does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from canao.compiler.schedules.vector_math import exp_expr, exp_poly


@dataclass(frozen=True)
class AttentionShape:
    batch: int
    seq: int
    heads: int
    head_dim: int
    # Each of Q, K, V is read from a 2-D [batch * seq, width] tensor at a column offset.
    q_width: int
    k_width: int
    v_width: int
    q_offset: int
    k_offset: int
    v_offset: int
    mask_shape: tuple[int, ...]  # additive mask, broadcast to [batch, heads, seq, seq]

    def __post_init__(self) -> None:
        span = self.heads * self.head_dim
        for name, width, offset in (
            ("q", self.q_width, self.q_offset),
            ("k", self.k_width, self.k_offset),
            ("v", self.v_width, self.v_offset),
        ):
            if offset < 0 or offset + span > width:
                raise ValueError(f"{name} columns {offset}..{offset + span} exceed width {width}")
        if len(self.mask_shape) != 4:
            raise ValueError(f"mask must be 4-D [B, H, S, S], got {self.mask_shape}")
        full = (self.batch, self.heads, self.seq, self.seq)
        for got, want in zip(self.mask_shape, full, strict=True):
            if got not in (1, want):
                raise ValueError(f"mask {self.mask_shape} does not broadcast to {full}")

    def name(self) -> str:
        return f"canao_attention_{self.batch}x{self.seq}x{self.heads}x{self.head_dim}"


def _largest_divisor(n: int, candidates: tuple[int, ...]) -> int:
    return next(c for c in candidates if n % c == 0)


def _tree(buffer: Any, width: int, kind: str) -> Any:
    """``buffer[0] op ... op buffer[width - 1]`` as a balanced tree (depth log2, not width)."""
    from tvm import tirx

    values = [buffer[i] for i in range(width)]
    while len(values) > 1:
        pairs = zip(values[0::2], values[1::2], strict=False)
        merged = [tirx.max(a, b) if kind == "max" else a + b for a, b in pairs]
        values = merged + ([values[-1]] if len(values) % 2 else [])
    return values[0]


# Scores of one head up to this size live on the worker's stack; longer sequences
# (S = 512: 1 MB) take a heap workspace, as phones give threads small stacks.
STACK_SCORES_BYTES = 256 * 1024


def _vector_registers(lanes: int) -> int:
    """Architectural vector registers: AVX2 (8 fp32 lanes) has 16; AVX-512 and NEON have 32."""
    return 16 if lanes == 8 else 32


def _rows_within(budget: int, vectors_per_row: int) -> tuple[int, ...]:
    """Candidate tile heights whose accumulators fit ``budget`` registers, tallest first."""
    return (*(m for m in (8, 4, 2) if m * vectors_per_row <= budget), 1)


def _output_tile(seq: int, head_dim: int, lanes: int, budget: int) -> tuple[int, int]:
    """(rows, columns) of the ``P @ V`` register tile: per step of the reduction it
    broadcasts one probability per row and loads one vector of V per column vector, so the
    tile that loads least per multiply-add within ``budget`` accumulators wins (taller on a
    tie: fewer passes over V).

    AVX2 (8 accumulators): 4 rows x 16 columns, 6 loads per 8 FMAs; a whole 64-wide row
    was 1 x 64, 9 loads per 8, and the kernel ran 1.4x slower (BERT-base, seq 128, 1
    thread: 1.18 -> 0.83 ms per layer). AVX-512 (16): 4 x 64 as before. NEON (16, 4
    lanes): 4 x 16 instead of 1 x 64.
    """
    vectors = max(1, head_dim // lanes)
    tiles = [
        (rows, width)
        for rows in _rows_within(budget, 1)
        for width in range(1, vectors + 1)
        if rows * width <= budget and seq % rows == 0 and vectors % width == 0
    ]  # 1 x 1 always fits
    rows, width = min(tiles, key=lambda t: ((t[0] + t[1]) / (t[0] * t[1]), -t[0]))
    return rows, min(head_dim, width * lanes)


def attention_primfunc(shape: AttentionShape, lanes: int = 16, approximate: bool = False) -> Any:
    """The scheduled TIR kernel for one attention shape.

    ``lanes``: the target's fp32 SIMD width. ``approximate``: I-BERT's polynomial
    exp (pipeline ``fast-approx``) instead of the float32-exact one.
    """
    from tvm.script import tirx as T

    B, S, H, D = shape.batch, shape.seq, shape.heads, shape.head_dim
    M = B * S
    QO, KO, VO = shape.q_offset, shape.k_offset, shape.v_offset
    # Register tiles: mr score rows x nb score columns (two vectors), as the dense kernels,
    # and mrv output rows x D for P @ V. Each keeps its accumulators in at most half the
    # vector registers, leaving room for loads and broadcasts: 8 rows x 2 vectors took all
    # 16 AVX2 registers (the kernel ran 1.12-1.18x slower), 8 rows x D=32 needs 64 NEON ones.
    NB = _largest_divisor(S, (2 * lanes, lanes, 8, 4, 2, 1))
    budget = _vector_registers(lanes) // 2
    MR = _largest_divisor(S, _rows_within(budget, -(-NB // lanes)))
    MRV, DC = _output_tile(S, D, lanes, budget) if D % lanes == 0 else (1, D)
    LANES = _largest_divisor(S, (lanes, 8, 4, 2, 1))  # partial max/sum per lane
    # Broadcast dimensions of the mask index at 0.
    mb, mh, mi, _ = (int(d != 1) for d in shape.mask_shape)
    NEG_INF = float("-inf")
    exp = exp_poly if approximate else exp_expr
    scores_scope = "local" if S * S * 4 <= STACK_SCORES_BYTES else "global"
    suffix = "_poly" if approximate else ""

    @T.prim_func
    def attention(
        q: T.Buffer((M, shape.q_width), "float32"),
        k: T.Buffer((M, shape.k_width), "float32"),
        v: T.Buffer((M, shape.v_width), "float32"),
        mask: T.Buffer(shape.mask_shape, "float32"),
        out: T.Buffer((B, S, H, D), "float32"),
    ):
        T.func_attr({"tirx.noalias": True})
        for bh in T.parallel(B * H):
            b = bh // H
            h = bh % H
            kt = T.alloc_local((D, S))
            # All S score rows of this head (S x S floats, L1/L2): the softmax loops and
            # the P @ V loops then stay separate, and the P @ V accumulators keep their
            # registers (one loop nest with exp's constants live made LLVM spill them).
            probs = T.alloc_buffer((S, S), "float32", scope=scores_scope)
            acc = T.alloc_local((MR, NB))
            out_acc = T.alloc_local((MRV, DC))
            row_max = T.alloc_local((S,))
            row_sum = T.alloc_local((S,))
            part = T.alloc_local((LANES,))
            for j, c in T.grid(S, D):
                kt[c, j] = k[b * S + j, KO + h * D + c]
            for block in range(S // MR):
                # scores = Q[block] @ Kt + mask, one mr x nb register tile at a time
                for tile in range(S // NB):
                    for ii in T.unroll(MR):
                        for jl in T.vectorized(NB):
                            acc[ii, jl] = T.float32(0)
                    for c in range(D):
                        for ii in T.unroll(MR):
                            for jl in T.vectorized(NB):
                                acc[ii, jl] += (
                                    q[b * S + block * MR + ii, QO + h * D + c]
                                    * kt[c, tile * NB + jl]
                                )
                    for ii in T.unroll(MR):
                        # (no let-bound indices inside vectorised loops: TVM mis-lowers them)
                        for jl in T.vectorized(NB):
                            probs[block * MR + ii, tile * NB + jl] = (
                                acc[ii, jl]
                                + mask[b * mb, h * mh, (block * MR + ii) * mi, tile * NB + jl]
                            )
                # exp(s - rowmax) and row sums; lane-wise partials keep both vectorised
                for ii in range(MR):
                    i = block * MR + ii
                    for lane in T.vectorized(LANES):
                        part[lane] = probs[i, lane]
                    for chunk in range(1, S // LANES):
                        for lane in T.vectorized(LANES):
                            part[lane] = T.max(part[lane], probs[i, chunk * LANES + lane])
                    row_max[i] = _tree(part, LANES, "max")
                    for j in T.vectorized(S):
                        probs[i, j] = exp(probs[i, j] - row_max[i])
                    for lane in T.vectorized(LANES):
                        part[lane] = probs[i, lane]
                    for chunk in range(1, S // LANES):
                        for lane in T.vectorized(LANES):
                            part[lane] += probs[i, chunk * LANES + lane]
                    row_sum[i] = _tree(part, LANES, "sum")
            for block, part_d in T.grid(S // MRV, D // DC):
                # out[block, part_d] = (P @ V) / row_sum, one mrv x dc register tile
                for ii in T.unroll(MRV):
                    for c in T.vectorized(DC):
                        out_acc[ii, c] = T.float32(0)
                for j in range(S):
                    for ii in T.unroll(MRV):
                        for c in T.vectorized(DC):
                            out_acc[ii, c] += (
                                probs[block * MRV + ii, j]
                                * v[b * S + j, VO + h * D + part_d * DC + c]
                            )
                for ii in T.unroll(MRV):
                    for c in T.vectorized(DC):
                        out[b, block * MRV + ii, h, part_d * DC + c] = T.Select(
                            row_max[block * MRV + ii] == T.float32(NEG_INF),
                            T.float32(0),
                            out_acc[ii, c] / row_sum[block * MRV + ii],
                        )

    flops = 4 * B * H * S * S * D
    return attention.with_attrs(
        {
            "global_symbol": shape.name() + suffix,
            # Opaque to FuseOps (FuseTIR would rebuild it without this schedule).
            "op_pattern": 8,
            "tirx.is_scheduled": True,
            "canao.flops": flops,
        }
    )
