"""canao.fusion.algebraic.simplify_elementwise: Before/Expected, one identity each."""

from __future__ import annotations

import tvm
from tvm.script import ir as I
from tvm.script import relax as R

from canao.fusion.algebraic import simplify_elementwise


def _check(before: tvm.IRModule, expected: tvm.IRModule) -> None:
    tvm.ir.assert_structural_equal(simplify_elementwise()(before), expected)


def test_scalar_multiply_and_divide_chain_folds_to_one_multiply() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                a = R.multiply(x, R.const(2.0, "float32"))
                b = R.multiply(R.const(3.0, "float32"), a)
                c = R.divide(b, R.const(4.0, "float32"))
                R.output(c)
            return c

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                c = R.multiply(x, R.const(1.5, "float32"))
                R.output(c)
            return c

    _check(Before, Expected)


def test_scalar_add_subtract_chain_folds_to_one_add() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                a = R.add(x, R.const(1.0, "float32"))
                b = R.subtract(a, R.const(0.25, "float32"))
                R.output(b)
            return b

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((4, 8), "float32")) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                b = R.add(x, R.const(0.75, "float32"))
                R.output(b)
            return b

    _check(Before, Expected)


def test_noop_broadcast_and_reshape_disappear_and_reshapes_compose() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 3, 4), "float32")) -> R.Tensor((6, 4), "float32"):
            with R.dataflow():
                a = R.broadcast_to(x, R.shape([2, 3, 4]))
                b = R.reshape(a, R.shape([2, 3, 4]))
                c = R.reshape(b, R.shape([2, 12]))
                d = R.reshape(c, R.shape([6, 4]))
                R.output(d)
            return d

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((2, 3, 4), "float32")) -> R.Tensor((6, 4), "float32"):
            with R.dataflow():
                d = R.reshape(x, R.shape([6, 4]))
                R.output(d)
            return d

    _check(Before, Expected)


def test_transpose_pairs_compose_or_cancel() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((1, 2, 3, 4), "float32")) -> R.Tensor((1, 3, 4, 2), "float32"):
            with R.dataflow():
                a = R.permute_dims(x, axes=[0, 2, 1, 3])  # (1, 3, 2, 4)
                b = R.permute_dims(a, axes=[0, 2, 1, 3])  # back to x
                c = R.permute_dims(b, axes=[0, 2, 1, 3])  # (1, 3, 2, 4)
                d = R.permute_dims(c, axes=[0, 1, 3, 2])  # (1, 3, 4, 2)
                R.output(d)
            return d

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((1, 2, 3, 4), "float32")) -> R.Tensor((1, 3, 4, 2), "float32"):
            with R.dataflow():
                d = R.permute_dims(x, axes=[0, 2, 3, 1])
                R.output(d)
            return d

    _check(Before, Expected)


def test_non_scalar_constants_and_division_by_zero_are_left_alone() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((2, 2), "float32"), y: R.Tensor((2, 2), "float32")) -> R.Tensor(
            (2, 2), "float32"
        ):
            with R.dataflow():
                a = R.multiply(x, y)
                b = R.divide(a, R.const(0.0, "float32"))
                R.output(b)
            return b

    _check(Before, Before)


def test_constant_weight_transposes_fold_in_numpy_like_fold_constant() -> None:
    import numpy as np
    from tvm import relax

    from canao.fusion.algebraic import fold_constant_transposes

    weight = np.arange(24, dtype="float32").reshape(2, 3, 4)
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4, 3, 2), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            flipped = bb.emit(relax.op.permute_dims(relax.const(weight)))
            swapped = bb.emit(relax.op.permute_dims(relax.const(weight), [0, 2, 1]))
            out = bb.emit_output(relax.op.add(x, flipped))
        bb.emit_func_output(relax.Tuple([out, swapped]))
    before = bb.get()
    ours = fold_constant_transposes()(before)
    tvms = relax.transform.FoldConstant()(before)
    tvm.ir.assert_structural_equal(ours, tvms)  # same constants, same graph
    left = []
    relax.analysis.post_order_visit(
        ours["main"].body,
        lambda n: left.append(n) if isinstance(n, relax.Call) and "permute" in str(n.op) else None,
    )
    assert not left
