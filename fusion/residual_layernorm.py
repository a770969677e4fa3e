"""FuseResidualLayerNorm: ``layer_norm(a + b)`` as one kernel.

BERT closes every sub-layer with ``LayerNorm(x + residual)``. TVM's FuseOps
keeps the add and the normalisation apart, so the sum is written to memory
and read back twice (mean, variance). This pass replaces the pair with one
TE kernel (sum, mean, variance, normalise, per row) that the CPU reduction
schedule keeps in cache row by row.

Exact: the same arithmetic in the same order as LegalizeOps' layer norm
(two-pass mean/variance in float32), applied to ``a + b``.

Where it runs: on high-level Relax, before LegalizeOps.
"""

from __future__ import annotations

from typing import Any

from canao.compiler.schedules.vector_math import row_reduce


def add_layer_norm_te(a: Any, b: Any, gamma: Any, beta: Any, epsilon: float) -> Any:
    """``(s - mean(s)) / sqrt(var(s) + eps) * gamma + beta`` with ``s = a + b``, last axis."""
    from tvm import te, tirx

    shape = a.shape
    rank = len(shape)
    width = shape[-1]
    total = te.compute(shape, lambda *i: a(*i) + b(*i), name="residual_sum")
    n = tirx.Cast("float32", width)
    rows = list(shape[:-1])
    row_sum = row_reduce(total, rows, width, "sum", "row_sum")

    def squared_deviation(*i: Any) -> Any:
        centred = total(*i) - row_sum(*i[:-1]) / n
        return centred * centred

    row_sq = row_reduce(squared_deviation, rows, width, "sum", "row_sq")

    def normalise(*i: Any) -> Any:
        row = i[: rank - 1]
        inv = tirx.rsqrt(row_sq(*row) / n + tirx.const(epsilon, "float32"))
        return (total(*i) - row_sum(*row) / n) * inv * gamma(i[-1]) + beta(i[-1])

    return te.compute(shape, normalise, name="layer_norm")


def fuse_residual_layer_norm() -> Any:
    """The pass (a ``tvm.transform.Pass``)."""
    import tvm
    from tvm import relax
    from tvm.relax.dpl import is_op, rewrite_call, wildcard

    a, b, gamma, beta = wildcard(), wildcard(), wildcard(), wildcard()
    pattern = is_op("relax.nn.layer_norm")(is_op("relax.add")(a, b), gamma, beta)

    @tvm.transform.module_pass(opt_level=0, name="canao.FuseResidualLayerNorm")
    def transform(mod: Any, _ctx: Any) -> Any:
        builder = relax.BlockBuilder(mod)

        def rewrite(expr: Any, matches: dict[Any, Any]) -> Any:
            lhs, rhs = matches[a], matches[b]
            axes = [int(x) for x in expr.attrs.axes]
            rank = len(expr.ty.shape)
            same_shape = _static(lhs) is not None and _static(lhs) == _static(rhs)
            if axes not in ([-1], [rank - 1]) or not same_shape or expr.ty.dtype != "float32":
                return expr  # broadcasting adds or other axes: leave to the generic path
            func = _primfunc(lhs, rhs, matches[gamma], matches[beta], float(expr.attrs.epsilon))
            gvar = builder.add_func(func, str(func.attrs["global_symbol"]))
            return relax.call_tir(
                gvar,
                [lhs, rhs, matches[gamma], matches[beta]],
                relax.TensorType(expr.ty.shape, "float32"),
            )

        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                builder.update_func(gvar, rewrite_call(pattern, rewrite, func))
        return builder.get()

    return transform


def _static(expr: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in expr.ty.shape.values)
    except (TypeError, AttributeError):
        return None  # symbolic or unknown shape


def _primfunc(lhs: Any, rhs: Any, gamma: Any, beta: Any, epsilon: float) -> Any:
    from tvm import te

    def placeholder(expr: Any, name: str) -> Any:
        return te.placeholder([int(d) for d in expr.ty.shape.values], expr.ty.dtype, name=name)

    args = [
        placeholder(e, n) for e, n in ((lhs, "a"), (rhs, "b"), (gamma, "gamma"), (beta, "beta"))
    ]
    func = te.create_prim_func([*args, add_layer_norm_te(*args, epsilon)])
    # create_prim_func names every function "main"; a module needs distinct symbols.
    shape = "x".join(str(d) for d in _static(lhs) or ())
    return func.with_attr("global_symbol", f"canao_add_layer_norm_{shape}")
