"""FuseAttention: BERT's attention block as one kernel reading the Q/K/V projection in place.

The exported attention is a chain of layout and element-wise operators
around two batched products::

    q = reshape(permute_dims(reshape(Qsrc, [B,S,H,D]), [0,2,1,3]), [B*H,S,D])
    k = reshape(permute_dims(reshape(Ksrc, [B,S,H,D]), [0,2,3,1]), [B*H,D,S])
    v = reshape(permute_dims(reshape(Vsrc, [B,S,H,D]), [0,2,1,3]), [B*H,S,D])
    s = reshape(matmul(q, k), [B,H,S,S]) + mask
    p = softmax(s)       (PyTorch SDPA also wraps it: rows that are all -inf -> 0)
    o = reshape(permute_dims(reshape(matmul(reshape(p), v), [B,H,S,D]), [0,2,1,3]), ...)

TVM's FuseOps makes nine kernels of it per layer. This pass replaces the
whole chain with one ``call_tir`` of :func:`~canao.compiler.schedules.attention.attention_primfunc`,
which reads Q, K and V straight from ``Qsrc``/``Ksrc``/``Vsrc`` (usually column
slices of the merged Q/K/V product) and writes ``[B,S,H,D]``, the token-major
layout the output projection reads. The transposes, the score tensor and the
mask/guard intermediates are never written.

Exact algebra: the permutations are index remappings, and ``softmax(s) @ v``
is computed as ``(exp(s - max) @ v) / sum`` (division distributed over the
sum); only float rounding differs.

Where it runs: on high-level Relax after ``pack_dense`` (so ``Qsrc`` is the
packed Q/K/V kernel's 2-D output) and before ``vectorised_math`` (which
would take the softmax). Anything that does not match exactly (another
mask form, a scale left between the products, symbolic shapes) is left alone.
"""

from __future__ import annotations

import math
from typing import Any

from canao.compiler.schedules.attention import AttentionShape, attention_primfunc


def _static(expr: Any) -> tuple[int, ...] | None:
    try:
        return tuple(int(d) for d in expr.ty.shape.values)
    except (TypeError, AttributeError):
        return None  # symbolic or unknown shape


def _ints(tuple_expr: Any) -> list[int]:
    return [int(getattr(item, "value", item)) for item in tuple_expr]


def _is_constant(expr: Any, value: float) -> bool:
    from tvm.ir.expr import GenericConst

    if not isinstance(expr, GenericConst):
        return False
    data = expr.value.numpy()
    return bool((data == value).all())


def _patterns() -> dict[str, Any]:
    from tvm.relax.dpl import is_const, is_op, wildcard

    def head_layout(source: Any) -> Any:
        split = is_op("relax.reshape")(source, wildcard())
        return is_op("relax.reshape")(is_op("relax.permute_dims")(split), wildcard())

    p: dict[str, Any] = {name: wildcard() for name in ("q_src", "k_src", "v_src", "mask")}
    p["q"], p["k"], p["v"] = (head_layout(p[n]) for n in ("q_src", "k_src", "v_src"))
    p["scores"] = is_op("relax.reshape")(is_op("relax.matmul")(p["q"], p["k"]), wildcard())
    p["masked"] = is_op("relax.add")(p["scores"], p["mask"])
    p["softmax"] = is_op("relax.nn.softmax")(p["masked"])
    # PyTorch SDPA's guard: where(not any(s != -inf, axis=-1), 0, softmax(s)).
    p["neg_inf"], p["zeros"] = is_const(), is_const()
    finite = is_op("relax.logical_not")(is_op("relax.equal")(p["masked"], p["neg_inf"]))
    p["any_finite"] = is_op("relax.max")(is_op("relax.astype")(finite))
    all_masked = is_op("relax.logical_not")(is_op("relax.astype")(p["any_finite"]))
    probs = is_op("relax.where")(all_masked, p["zeros"], p["softmax"]) | p["softmax"]
    p["probs"] = is_op("relax.reshape")(probs, wildcard())
    p["context"] = is_op("relax.matmul")(p["probs"], p["v"])
    merged = is_op("relax.permute_dims")(is_op("relax.reshape")(p["context"], wildcard()))
    p["out"] = is_op("relax.reshape")(merged, wildcard())
    return p


class _Match:
    """One matched attention block: checks every layout step, then says what to read."""

    def __init__(self, matches: dict[Any, Any], p: dict[str, Any], var2val: dict[Any, Any]):
        self.m = {name: matches.get(pattern) for name, pattern in p.items()}
        self.var2val = var2val

    def value(self, expr: Any) -> Any:
        return self.var2val.get(expr, expr)

    def plan(self) -> tuple[AttentionShape, list[Any]] | None:
        """The kernel's shape and the 2-D tensors it reads for Q, K, V; None: leave it alone."""
        q, k, v = (self.value(self.m[n]) for n in "qkv")
        q4 = _static(self.value(self.value(q.args[0]).args[0]))  # [B,S,H,D] before permuting
        scores = _static(self.m["scores"])
        if q4 is None or scores is None or len(q4) != 4:
            return None
        batch, seq, heads, dim = q4
        if scores != (batch, heads, seq, seq) or not self._layouts_fit(q, k, v, q4):
            return None
        sources = [self.source(self.m[f"{n}_src"], batch * seq, heads * dim) for n in "qkv"]
        mask = _static(self.m["mask"])
        if None in sources or mask is None or self.m["mask"].ty.dtype != "float32":
            return None
        (qs, qw, qo), (ks, kw, ko), (vs, vw, vo) = sources  # type: ignore[misc]
        try:
            shape = AttentionShape(batch, seq, heads, dim, qw, kw, vw, qo, ko, vo, mask)
        except ValueError:
            return None  # a mask that does not broadcast per head and row
        return shape, [qs, ks, vs]

    def _layouts_fit(self, q: Any, k: Any, v: Any, q4: tuple[int, ...]) -> bool:
        batch, seq, heads, dim = q4
        wanted = {
            "q": ((0, 2, 1, 3), (batch * heads, seq, dim)),
            "k": ((0, 2, 3, 1), (batch * heads, dim, seq)),
            "v": ((0, 2, 1, 3), (batch * heads, seq, dim)),
        }
        for name, expr in zip("qkv", (q, k, v), strict=True):
            permute = self.value(expr.args[0])
            split = self.value(permute.args[0])
            axes, shape = wanted[name]
            if tuple(int(a) for a in permute.attrs.axes) != axes or _static(expr) != shape:
                return False
            if _static(split) != q4:
                return False
        merged = self.value(self.value(self.m["out"]).args[0])
        context4 = self.value(merged.args[0])
        return (
            tuple(int(a) for a in merged.attrs.axes) == (0, 2, 1, 3)
            and _static(context4) == (batch, heads, seq, dim)
            and self._softmax_fits()
        )

    def _softmax_fits(self) -> bool:
        softmax = self.value(self.m["softmax"])
        if int(softmax.attrs.axis) not in (-1, 3):
            return False
        if self.m["any_finite"] is None:
            return True  # no SDPA guard around this softmax
        any_finite = self.value(self.m["any_finite"])
        axes = [int(a) for a in any_finite.attrs.axis]
        return (
            axes in ([-1], [3])
            and bool(any_finite.attrs.keepdims)
            and _is_constant(self.m["neg_inf"], float("-inf"))
            and _is_constant(self.m["zeros"], 0.0)
        )

    def source(self, expr: Any, rows: int, span: int) -> tuple[Any, int, int] | None:
        """(2-D tensor to read, its width, column offset) for one of Q, K, V."""
        from tvm import relax

        offset = 0
        value = self.value(expr)
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.strided_slice":
            shape = _static(value.args[0])
            axes, begin, end = (_ints(a) for a in value.args[1:4])
            strides = _ints(value.args[4]) if len(value.args) > 4 else [1]
            if shape is None or axes not in ([len(shape) - 1], [-1]) or strides != [1]:
                return None
            if end[0] - begin[0] != span:
                return None
            expr, offset = value.args[0], begin[0]
        shape = _static(expr)
        if shape is None or math.prod(shape[:-1]) != rows:
            return None
        if len(shape) != 2:  # [B, S, W]: the same memory as [B * S, W]
            expr = relax.op.reshape(expr, (rows, shape[-1]))
        return expr, shape[-1], offset


def fuse_attention(lanes: int = 16, approximate: bool = False) -> Any:
    """The pass (a ``tvm.transform.Pass``).

    ``lanes``: the target's fp32 SIMD width; ``approximate``: polynomial exp (``fast-approx``).
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    p = _patterns()

    @tvm.transform.module_pass(opt_level=0, name="canao.FuseAttention")
    def transform(mod: Any, _ctx: Any) -> Any:
        builder = relax.BlockBuilder(mod)
        kernels: dict[AttentionShape, Any] = {}

        def kernel(shape: AttentionShape) -> Any:
            if shape not in kernels:
                func = attention_primfunc(shape, lanes, approximate)
                kernels[shape] = builder.add_func(func, str(func.attrs["global_symbol"]))
            return kernels[shape]

        def rewrite(expr: Any, matches: dict[Any, Any], var2val: dict[Any, Any]) -> Any:
            plan = _Match(matches, p, var2val).plan()
            if plan is None:
                return expr
            shape, sources = plan
            out = (shape.batch, shape.seq, shape.heads, shape.head_dim)
            call = relax.call_tir(
                kernel(shape), [*sources, matches[p["mask"]]], relax.TensorType(out, "float32")
            )
            return relax.op.reshape(call, expr.ty.shape)

        for gvar, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                var2val = relax.analysis.get_var2val(func)
                updated = rewrite_call(p["out"], lambda e, m, v=var2val: rewrite(e, m, v), func)
                builder.update_func(gvar, updated)
        return builder.get()

    return transform
