"""canao.fusion.algebraic.fold_scale_into_dense: Before/Expected, plus whole-model effect."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from canao.compiler.importer import InputSpec, import_bert
from canao.compiler.models import load_model
from canao.fusion.algebraic import fold_scale_into_dense, simplify_elementwise

W = np.arange(8 * 4, dtype=np.float32).reshape(8, 4) / 10
B = np.arange(4, dtype=np.float32)


def test_scale_travels_through_layout_ops_into_weights_and_bias() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((6, 8), "float32")) -> R.Tensor((2, 4, 3), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(W))
                z = R.add(R.const(B), y)
                r = R.reshape(z, R.shape([2, 3, 4]))
                p = R.permute_dims(r, axes=[0, 2, 1])
                s = R.multiply(p, R.const(0.5, "float32"))
                R.output(s)
            return s

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((6, 8), "float32")) -> R.Tensor((2, 4, 3), "float32"):
            with R.dataflow():
                y = R.matmul(x, R.const(W * np.float32(0.5)))
                z = R.add(R.const(B * np.float32(0.5)), y)
                r = R.reshape(z, R.shape([2, 3, 4]))
                s = R.permute_dims(r, axes=[0, 2, 1])
                R.output(s)
            return s

    tvm.ir.assert_structural_equal(fold_scale_into_dense()(Before), Expected)


def test_scale_of_an_activation_product_is_left_alone() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((6, 8), "float32"), w: R.Tensor((8, 4), "float32")) -> R.Tensor(
            (6, 4), "float32"
        ):
            with R.dataflow():
                y = R.matmul(x, w)  # not a constant weight: nothing to fold into
                s = R.multiply(y, R.const(0.5, "float32"))
                R.output(s)
            return s

    expected = Before.clone()
    tvm.ir.assert_structural_equal(fold_scale_into_dense()(Before), expected)


def test_bert_attention_scales_vanish(tiny_config) -> None:
    mod = import_bert(load_model(tiny_config).module, InputSpec(1, 16))
    mod = relax.transform.FoldConstant()(mod)
    assert mod["main"].script(show_meta=False).count("R.multiply(") == 4  # sqrt(scale) on Q, K
    folded = tvm.transform.Sequential(
        [simplify_elementwise(), fold_scale_into_dense(), simplify_elementwise()]
    )(mod)
    assert folded["main"].script(show_meta=False).count("R.multiply(") == 0
