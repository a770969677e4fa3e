"""exp, erf and GELU as plain arithmetic, so LLVM vectorises them.

TVM lowers ``T.exp`` / ``T.erf`` on x86 to calls of libm's scalar ``expf`` /
``erff``, one call per element: softmax and GELU then cost more than the
matrix products around them. These expressions evaluate the same functions
with float32-level accuracy (bounds below are tested), so they replace the
library calls by default. They are not the lossy low-degree approximations
of the fusion work (issue 4), which stay optional.

- :func:`exp_expr`: Cephes ``expf`` (Cody-Waite reduction by ln 2 split in two
  constants, degree-6 polynomial): relative error <= 2e-7 on [-87, 88].
- :func:`erf_expr`: Eigen's float rational approximation (also TVM's
  ``topi.fast_erf``): absolute error <= 3e-7.
"""

from __future__ import annotations

from typing import Any

_LOG2E = 1.44269504088896341
_LN2_HI = 0.693359375  # ln 2 split so that n * _LN2_HI is exact in float32
_LN2_LO = -2.12194440e-4
_EXP_POLY = (
    1.9875691500e-4,
    1.3981999507e-3,
    8.3334519073e-3,
    4.1665795894e-2,
    1.6666665459e-1,
    5.0000001201e-1,
)  # highest power first
_EXP_MAX = 88.3762626647949  # beyond: float32 overflow
_EXP_MIN = -88.3762626647949  # below: result flushes to 0 (the true value is < 1e-38)

_ERF_ALPHA = (
    -2.72614225801306e-10,
    2.77068142495902e-08,
    -2.10102402082508e-06,
    -5.69250639462346e-05,
    -7.34990630326855e-04,
    -2.95459980854025e-03,
    -1.60960333262415e-02,
)  # odd numerator, highest power first
_ERF_BETA = (
    -1.45660718464996e-05,
    -2.13374055278905e-04,
    -1.68282697438203e-03,
    -7.37332916720468e-03,
    -1.42647390514189e-02,
)  # even denominator, highest power first


def _const(value: float) -> Any:
    from tvm import te

    return te.const(value, "float32")


def _horner(coefficients: tuple[float, ...], x: Any) -> Any:
    result = _const(coefficients[0])
    for coefficient in coefficients[1:]:
        result = result * x + _const(coefficient)
    return result


def exp_expr(x: Any) -> Any:
    """exp(x) for float32 as vectorisable arithmetic (Cephes expf)."""
    from tvm import te, tirx

    x = te.max(te.min(x, _const(_EXP_MAX)), _const(_EXP_MIN))
    n = te.floor(x * _const(_LOG2E) + _const(0.5))
    r = x - n * _const(_LN2_HI) - n * _const(_LN2_LO)
    y = _horner(_EXP_POLY, r) * r * r + r + _const(1.0)
    # 2^n built in the exponent field; n = -127 gives +0, the flush-to-zero end.
    two_n = tirx.reinterpret("float32", (n.astype("int32") + 127) << 23)
    return y * two_n


def erf_expr(x: Any) -> Any:
    """erf(x) for float32 as vectorisable arithmetic (Eigen's rational approximation)."""
    from tvm import te

    x = te.max(te.min(x, _const(4.0)), _const(-4.0))  # erf is +-1 in float32 beyond 4
    x2 = x * x
    return x * _horner(_ERF_ALPHA, x2) / _horner(_ERF_BETA, x2)


def gelu_expr(x: Any) -> Any:
    """GELU in its exact (erf) form, as PyTorch's ``nn.GELU()`` computes it."""
    return _const(0.5) * x * (_const(1.0) + erf_expr(x * _const(0.7071067811865476)))


# A row reduction accumulates into this many independent partial results: one
# long dependent chain of adds (4 cycles each) otherwise bounds softmax and
# layer norm, however well the rest is vectorised.
PARTIALS = 16


def _static_int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None  # a symbolic extent


def row_reduce(value: Any, rows: list[Any], width: int, kind: str, name: str) -> Any:
    """``kind`` ("sum" or "max") of ``value(*row, n)`` over ``n < width``, per row (a TE tensor).

    With ``width`` a multiple of :data:`PARTIALS`, element ``n`` goes to partial
    ``n % PARTIALS`` first, then the partials are combined: the same values in
    another order (exact for max; for sum, float rounding differs in the last bits).
    """
    from tvm import te

    reducer = te.sum if kind == "sum" else te.max
    static = _static_int(width)
    if static is None or static % PARTIALS or static < 2 * PARTIALS:
        k = te.reduce_axis((0, width), name=f"{name}_k")
        return te.compute(rows, lambda *i: reducer(value(*i, k), axis=k), name=name)
    j = te.reduce_axis((0, static // PARTIALS), name=f"{name}_j")
    partial = te.compute(
        (*rows, PARTIALS),
        lambda *i: reducer(value(*i[:-1], j * PARTIALS + i[-1]), axis=j),
        name=f"{name}_partial",
    )
    lane = te.reduce_axis((0, PARTIALS), name=f"{name}_lane")
    return te.compute(rows, lambda *i: reducer(partial(*i, lane), axis=lane), name=name)


def softmax_te(data: Any, axis: int, approximate: bool = False) -> Any:
    """Numerically stable softmax over ``axis`` with :func:`exp_expr` (or :func:`exp_poly`)."""
    from tvm import te

    rank = len(data.shape)
    axis = axis % rank
    if axis != rank - 1:
        from tvm import topi

        return topi.nn.softmax(data, axis)  # not BERT's case: TVM's own definition
    rows, width = list(data.shape[:-1]), data.shape[-1]
    row_max = row_reduce(data, rows, width, "max", "softmax_max")
    exp = exp_poly if approximate else exp_expr
    exps = te.compute(data.shape, lambda *i: exp(data(*i) - row_max(*i[:-1])), name="softmax_exp")
    total = row_reduce(exps, rows, width, "sum", "softmax_sum")
    return te.compute(data.shape, lambda *i: exps(*i) / total(*i[:-1]), name="softmax_norm")


def gelu_te(data: Any, approximate: bool = False) -> Any:
    """Element-wise GELU with :func:`erf_expr` (or :func:`erf_poly`) (a TE tensor)."""
    from tvm import te

    gelu = gelu_poly if approximate else gelu_expr
    return te.compute(data.shape, lambda *i: gelu(data(*i)), name="gelu")


_REPLACED = ("relax.nn.softmax", "relax.nn.gelu")


def vectorised_math(approximate: bool = False) -> Any:
    """Relax pass: ``R.nn.softmax`` -> :func:`softmax_te`, ``R.nn.gelu`` -> :func:`gelu_te`.

    Runs before LegalizeOps, after any pass that wants to see the original ops
    (a GELU already fused into a dense kernel's epilogue is not here any more).
    """
    import tvm
    from tvm import relax

    @relax.expr_functor.mutator
    class _Mutator(relax.PyExprMutator):
        def visit_call_(self, call: Any) -> Any:
            call = super().visit_call_(call)
            if not isinstance(call.op, tvm.ir.Op) or call.op.name not in _REPLACED:
                return call
            if getattr(call.args[0].ty, "dtype", None) != "float32":
                return call
            if call.op.name == "relax.nn.softmax":
                return self.builder_.call_te(
                    softmax_te,
                    call.args[0],
                    int(call.attrs.axis),
                    approximate,
                    primfunc_name_hint="softmax",
                )
            if call.op.name == "relax.nn.gelu":
                return self.builder_.call_te(
                    gelu_te, call.args[0], approximate, primfunc_name_hint="gelu"
                )
            return call

    @tvm.transform.module_pass(opt_level=0, name="canao.VectorisedMath")
    def transform(mod: Any, _ctx: Any) -> Any:
        mutator = _Mutator(mod)
        for gvar, func in mod.functions_items():
            if isinstance(func, relax.Function):
                mutator.builder_.update_func(gvar, mutator.visit_expr(func))
        return mutator.builder_.get()

    return transform


# ------------------------------------------------------------------ lossy approximations
# Optional, off by default (pipeline ``fast-approx``): I-BERT's second-order
# polynomials (Kim et al. 2021), cheaper than the float32-accurate forms above.
# Stated bounds (checked by tests/test_approximations.py):
#   gelu_poly: |gelu_poly(x) - gelu(x)| <= 1.9e-2 for all x (erf_poly alone is off by
#              up to 9.7e-2 near 0, where GELU multiplies it by x);
#   exp_poly: |exp_poly(x) / exp(x) - 1| <= 4e-3 for x in [-80, 0] (softmax's shifted range).
_IBERT_ERF_A, _IBERT_ERF_B = -0.2888, -1.769
_IBERT_EXP = (0.3585, 1.353, 0.344)
_LN2 = 0.6931471805599453


def erf_poly(x: Any) -> Any:
    """``sign(x) * (a * (min(|x|, -b) + b)^2 + 1)``: I-BERT's erf."""
    from tvm import te, tirx

    clipped = te.min(tirx.abs(x), _const(-_IBERT_ERF_B)) + _const(_IBERT_ERF_B)
    magnitude = _const(_IBERT_ERF_A) * clipped * clipped + _const(1.0)
    return tirx.Select(x < _const(0.0), -magnitude, magnitude)


def exp_poly(x: Any) -> Any:
    """exp for ``x <= 0``: ``x = p - z ln2``, ``exp(p) ~ a (p + b)^2 + c``, times ``2^-z``."""
    from tvm import te, tirx

    x = te.max(x, _const(_EXP_MIN))
    z = te.floor(-x / _const(_LN2))
    p = x + z * _const(_LN2)
    a, b, c = (_const(v) for v in _IBERT_EXP)
    two_minus_z = tirx.reinterpret("float32", (127 - z.astype("int32")) << 23)
    return (a * (p + b) * (p + b) + c) * two_minus_z


def gelu_poly(x: Any) -> Any:
    return _const(0.5) * x * (_const(1.0) + erf_poly(x * _const(0.7071067811865476)))
