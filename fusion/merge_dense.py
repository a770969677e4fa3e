"""MergeParallelDense: dense layers that read the same input become one matrix product.

Attention computes Q, K and V as three ``x @ W + b`` on the same ``x``. This
pass concatenates their constant weights and biases into one ``[K, 3N]``
product (one kernel, one pass over ``x``) and slices the three results out
of it; the slices are layout-only and TVM's FuseOps folds them into the
head-split reshapes/transposes that follow, so no kernel is added back.

Exact: every output element is the same dot product with the same bias.

Where it runs (it starts with common subexpression elimination, so that the
projections read one variable): on high-level Relax, after constant folding and
``fold_scale_into_dense`` (so Q and K already carry the attention scale),
before ``pack_dense``. TVM's own ``CombineParallelMatmul`` does not apply
here: it expects the weights as function parameters, not constants.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass
class _Dense:
    product: Any  # the binding ``v = matmul(x, W)``
    biased: Any  # the binding ``u = add(b, v)`` (or ``add(v, b)``)
    weight: np.ndarray
    bias: np.ndarray


def _constant(expr: Any) -> np.ndarray | None:
    from tvm.ir.expr import GenericConst  # relax.Constant in TVM < 0.27

    return expr.value.numpy() if isinstance(expr, GenericConst) else None


def _use_counts(func: Any) -> Counter[Any]:
    from tvm import relax

    counts: Counter[Any] = Counter()
    for block in func.body.blocks:
        for binding in block.bindings:
            counts.update(relax.analysis.free_vars(binding.value))
    counts.update(relax.analysis.free_vars(func.body.body))
    return counts


def _dense_layers(block: Any, uses: Counter[Any]) -> list[_Dense]:
    """``u = add(b, matmul(x, W))`` pairs whose product feeds nothing but its bias add."""
    from tvm import relax

    products = {}
    for binding in block.bindings:
        value = binding.value
        if isinstance(value, relax.Call) and getattr(value.op, "name", "") == "relax.matmul":
            weight = _constant(value.args[1])
            if (
                isinstance(value.args[0], relax.Var)
                and weight is not None
                and weight.ndim == 2
                and weight.dtype == np.float32
            ):
                products[binding.var] = (binding, weight)
    layers = []
    for binding in block.bindings:
        value = binding.value
        if not isinstance(value, relax.Call) or getattr(value.op, "name", "") != "relax.add":
            continue
        for mine, other in ((0, 1), (1, 0)):
            product = value.args[mine]
            bias = _constant(value.args[other])
            if product in products and uses[product] == 1 and bias is not None:
                product_binding, weight = products[product]
                if bias.shape == (weight.shape[1],) and bias.dtype == np.float32:
                    layers.append(_Dense(product_binding, binding, weight, bias))
                break
    return layers


def _merge_block(block: Any, uses: Counter[Any]) -> Any:
    from tvm import relax

    groups: dict[Any, list[_Dense]] = defaultdict(list)
    for layer in _dense_layers(block, uses):
        groups[layer.product.value.args[0]].append(layer)
    replacement: dict[Any, list[Any]] = {}  # first product binding -> bindings to emit
    dropped: set[Any] = set()
    for x, members in groups.items():
        if len(members) < 2:
            continue
        weight = np.concatenate([m.weight for m in members], axis=1)
        bias = np.concatenate([m.bias for m in members])
        rows = members[0].biased.var.ty.shape.values[0]
        merged_product = relax.DataflowVar(
            "merged_dense", relax.TensorType((rows, weight.shape[1]), "float32")
        )
        merged = relax.DataflowVar("merged_dense_bias", merged_product.ty)
        emitted = [
            relax.VarBinding(merged_product, relax.op.matmul(x, relax.const(weight))),
            relax.VarBinding(merged, relax.op.add(relax.const(bias), merged_product)),
        ]
        offset = 0
        for member in members:
            width = member.weight.shape[1]
            sliced = relax.op.strided_slice(merged, axes=[1], begin=[offset], end=[offset + width])
            emitted.append(relax.VarBinding(member.biased.var, sliced))
            offset += width
            dropped.update((member.product.var, member.biased.var))
        first = min(members, key=lambda m: list(block.bindings).index(m.product))
        replacement[first.product.var] = emitted
    if not replacement:
        return block
    bindings = []
    for binding in block.bindings:
        if binding.var in replacement:
            bindings.extend(replacement[binding.var])
        elif binding.var not in dropped:
            bindings.append(binding)
    return relax.DataflowBlock(bindings)


def merge_parallel_dense() -> Any:
    """The pass (a ``tvm.transform.Pass``)."""
    import tvm
    from tvm import relax

    @tvm.transform.module_pass(opt_level=0, name="canao.MergeParallelDense")
    def transform(mod: Any, _ctx: Any) -> Any:
        # The importer reshapes the shared input once per projection: common
        # subexpression elimination makes Q, K and V read one variable.
        mod = relax.transform.EliminateCommonSubexpr()(mod)
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function) or not isinstance(func.body, relax.SeqExpr):
                continue
            uses = _use_counts(func)
            blocks = [
                _merge_block(b, uses) if isinstance(b, relax.DataflowBlock) else b
                for b in func.body.blocks
            ]
            body = relax.SeqExpr(blocks, func.body.body)
            mod[gvar] = relax.Function(func.params, body, func.ret_ty, func.is_pure, func.attrs)
        return relax.transform.Normalize()(mod)

    return transform
