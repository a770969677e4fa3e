"""Exact algebraic rewriting of element-wise and layout chains.

Two passes, both on high-level Relax before LegalizeOps:

:func:`simplify_elementwise` -- identities that remove operators outright:
  ``broadcast_to(x, shape(x)) -> x``, ``reshape(x, shape(x)) -> x``,
  ``reshape(reshape(x, s1), s2) -> reshape(x, s2)``,
  ``permute_dims(permute_dims(x, p), q) -> permute_dims(x, p o q)`` (or ``x``),
  ``(x * c1) * c2 -> x * (c1 c2)``, ``(x + c1) + c2 -> x + (c1 + c2)``,
  ``x - c -> x + (-c)``, ``x / c -> x * (1/c)`` for scalar constants ``c``.

:func:`fold_scale_into_dense` -- a scalar multiply is pushed through
  shape-only operators (reshape, permute_dims, broadcast_to) up to the dense
  layer that produced the tensor and folded into its constants:
  ``(x @ W + b) * c -> x @ (c W) + c b``. This is how BERT's attention scale
  ``1/sqrt(d)`` (applied by PyTorch's SDPA as ``sqrt`` of it on both Q and K)
  disappears into the query and key weights.

Exact in real arithmetic; in float32 a folded product is rounded once instead
of twice, so results move by at most a few ulps (tests hold them to 1e-5).
"""

from __future__ import annotations

from typing import Any

import numpy as np

_SHAPE_OPS = ("relax.reshape", "relax.permute_dims", "relax.broadcast_to")


def _shape(expr: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in expr.ty.shape.values)
    except (TypeError, AttributeError):
        return None


def _scalar(expr: Any) -> float | None:
    """The value of a float32 scalar (or all-ones-shape) constant, else None."""
    from tvm.ir.expr import GenericConst  # relax.Constant in TVM < 0.27

    if not isinstance(expr, GenericConst) or expr.ty.dtype != "float32":
        return None
    value = expr.value.numpy()
    return float(value.reshape(-1)[0]) if value.size == 1 else None


def _const(value: float) -> Any:
    from tvm import relax

    return relax.const(np.float32(value), "float32")


def _apply_until_stable(pattern_rewrites: list[tuple[Any, Any]], func: Any, limit: int = 16) -> Any:
    """Apply (pattern, rewriter) pairs until a whole sweep changes nothing."""
    from tvm.relax.dpl import rewrite_call

    changes = [0]

    def counting(rewriter: Any) -> Any:
        def wrapped(expr: Any, matches: Any) -> Any:
            new = rewriter(expr, matches)
            if new is not expr:
                changes[0] += 1
            return new

        return wrapped

    counted = [(pattern, counting(rewriter)) for pattern, rewriter in pattern_rewrites]
    for _ in range(limit):
        changes[0] = 0
        for pattern, rewriter in counted:
            func = rewrite_call(pattern, rewriter, func)
        if not changes[0]:
            break
    return func


def _module_pass(name: str, rules: Any) -> Any:
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name=name)
    def transform(mod: Any, _ctx: Any) -> Any:
        mod = mod.clone()  # a pass must not change its input module
        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                mod[gvar] = _apply_until_stable(rules(), func)
        return mod

    return transform


# --------------------------------------------------------------------- simplify_elementwise


def _axes(call: Any, rank: int) -> list[int]:
    axes = call.attrs.axes
    if axes is None:
        return list(reversed(range(rank)))
    return [int(a) % rank for a in axes]


def _simplify_rules() -> list[tuple[Any, Any]]:
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, c1, c2 = wildcard(), is_const(), is_const()
    inner_reshape = is_op("relax.reshape")(x, wildcard())
    inner_permute = is_op("relax.permute_dims")(x)

    def same_shape_noop(expr: Any, m: Any) -> Any:
        arg = expr.args[0]
        return arg if _shape(arg) is not None and _shape(arg) == _shape(expr) else expr

    def reshape_of_reshape(expr: Any, m: Any) -> Any:
        return relax.op.reshape(m[x], expr.args[1])

    def permute_of_permute(expr: Any, m: Any) -> Any:
        rank = len(_shape(expr) or ())
        if not rank:
            return expr
        p, q = _axes(m[inner_permute], rank), _axes(expr, rank)
        composed = [p[i] for i in q]
        return m[x] if composed == list(range(rank)) else relax.op.permute_dims(m[x], composed)

    def scalar_chain(make: Any, combine: Any) -> Any:
        def rewrite(expr: Any, m: Any) -> Any:
            a, b = _scalar(m[c1]), _scalar(m[c2])
            return expr if a is None or b is None else make(m[x], _const(combine(a, b)))

        return rewrite

    def subtract_const(expr: Any, m: Any) -> Any:
        value = _scalar(m[c1])
        return expr if value is None else relax.op.add(m[x], _const(-value))

    def divide_const(expr: Any, m: Any) -> Any:
        value = _scalar(m[c1])
        return expr if not value else relax.op.multiply(m[x], _const(1.0 / value))

    def chains(op: str) -> list[Any]:
        """``(x op c1) op c2`` in all four operand orders."""
        inner = [is_op(op)(x, c1), is_op(op)(c1, x)]
        return [is_op(op)(i, c2) for i in inner] + [is_op(op)(c2, i) for i in inner]

    multiply = scalar_chain(relax.op.multiply, lambda a, b: a * b)
    add = scalar_chain(relax.op.add, lambda a, b: a + b)
    return [
        (is_op("relax.broadcast_to")(wildcard(), wildcard()), same_shape_noop),
        (is_op("relax.reshape")(wildcard(), wildcard()), same_shape_noop),
        (is_op("relax.reshape")(inner_reshape, wildcard()), reshape_of_reshape),
        (is_op("relax.permute_dims")(inner_permute), permute_of_permute),
        *[(pattern, multiply) for pattern in chains("relax.multiply")],
        *[(pattern, add) for pattern in chains("relax.add")],
        (is_op("relax.subtract")(x, c1), subtract_const),
        (is_op("relax.divide")(x, c1), divide_const),
    ]


def simplify_elementwise() -> Any:
    """The pass: see the module docstring."""
    return _module_pass("canao.SimplifyElementwise", _simplify_rules)


# --------------------------------------------------------------------- fold_scale_into_dense


def _fold_scale_rules() -> list[tuple[Any, Any]]:
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, c, w, b = wildcard(), is_const(), is_const(), is_const()
    rules: list[tuple[Any, Any]] = []

    def push_through(shape_pattern: Any) -> Any:
        def rewrite(expr: Any, m: Any) -> Any:
            shaped = m[shape_pattern]
            scaled = relax.op.multiply(shaped.args[0], m[c])
            return relax.Call(shaped.op, [scaled, *shaped.args[1:]], shaped.attrs)

        return rewrite

    for op in _SHAPE_OPS:
        shaped = (
            is_op(op)(wildcard())
            if op == "relax.permute_dims"
            else is_op(op)(wildcard(), wildcard())
        )
        for pattern in (is_op("relax.multiply")(shaped, c), is_op("relax.multiply")(c, shaped)):
            rules.append((pattern, push_through(shaped)))

    def fold(expr: Any, m: Any) -> Any:
        scale = _scalar(m[c])
        weight, bias = m[w].value.numpy(), m[b].value.numpy()
        if scale is None or weight.dtype != np.float32 or bias.dtype != np.float32:
            return expr
        dense = relax.op.matmul(m[x], relax.const(weight * np.float32(scale)))
        return relax.op.add(relax.const(bias * np.float32(scale)), dense)

    dense = is_op("relax.matmul")(x, w)
    for biased in (is_op("relax.add")(b, dense), is_op("relax.add")(dense, b)):
        rules += [
            (is_op("relax.multiply")(biased, c), fold),
            (is_op("relax.multiply")(c, biased), fold),
        ]
    return rules


def fold_scale_into_dense() -> Any:
    """The pass: see the module docstring."""
    return _module_pass("canao.FoldScaleIntoDense", _fold_scale_rules)


# --------------------------------------------------------------------- fold_constant_transposes


def _transpose_rules() -> list[tuple[Any, Any]]:
    from tvm import relax
    from tvm.relax.dpl import is_const, is_op

    weight = is_const()
    pattern = is_op("relax.permute_dims")(weight)

    def rewrite(expr: Any, matches: Any) -> Any:
        array = matches[weight].value.numpy()
        return relax.const(np.ascontiguousarray(np.transpose(array, _axes(expr, array.ndim))))

    return [(pattern, rewrite)]


def fold_constant_transposes() -> Any:
    """``permute_dims(W) -> W^T`` for constant ``W``, transposed in NumPy.

    PyTorch's ``linear`` keeps weights as [N, K] and the import transposes each one;
    Relax's FoldConstant would compile and run a TVM kernel per distinct weight
    shape (1.4 s of a 6-layer MiniLM's build). A transpose is a copy: exact.
    """
    return _module_pass("canao.FoldConstantTransposes", _transpose_rules)
