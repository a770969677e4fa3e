"""canao.fusion.merge_dense.merge_parallel_dense: Before/Expected and whole-model effect."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from canao.compiler.importer import InputSpec, import_bert
from canao.compiler.models import load_model
from canao.fusion.merge_dense import merge_parallel_dense

RNG = np.random.default_rng(0)
WQ, WK = (RNG.standard_normal((8, 4)).astype(np.float32) for _ in range(2))
BQ, BK = (RNG.standard_normal(4).astype(np.float32) for _ in range(2))


def test_two_dense_layers_on_one_input_become_one_product() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((6, 8), "float32")) -> R.Tuple(
            R.Tensor((6, 4), "float32"), R.Tensor((6, 4), "float32")
        ):
            with R.dataflow():
                q0 = R.matmul(x, R.const(WQ))
                q = R.add(R.const(BQ), q0)
                k0 = R.matmul(x, R.const(WK))
                k = R.add(k0, R.const(BK))
                out = (q, k)
                R.output(out)
            return out

    @I.ir_module
    class Expected:
        @R.function
        def main(x: R.Tensor((6, 8), "float32")) -> R.Tuple(
            R.Tensor((6, 4), "float32"), R.Tensor((6, 4), "float32")
        ):
            with R.dataflow():
                merged = R.matmul(x, R.const(np.concatenate([WQ, WK], axis=1)))
                biased = R.add(R.const(np.concatenate([BQ, BK])), merged)
                q = R.strided_slice(biased, axes=[1], begin=[0], end=[4])
                k = R.strided_slice(biased, axes=[1], begin=[4], end=[8])
                out = (q, k)
                R.output(out)
            return out

    tvm.ir.assert_structural_equal(merge_parallel_dense()(Before), Expected)


def test_a_product_with_another_consumer_is_left_alone() -> None:
    @I.ir_module
    class Before:
        @R.function
        def main(x: R.Tensor((6, 8), "float32")) -> R.Tensor((6, 4), "float32"):
            with R.dataflow():
                q0 = R.matmul(x, R.const(WQ))
                q = R.add(R.const(BQ), q0)
                k0 = R.matmul(x, R.const(WK))
                k = R.add(k0, R.const(BK))
                both = R.add(q, k)
                out = R.add(both, q0)  # q0 is also read here: merging would need it too
                R.output(out)
            return out

    expected = Before.clone()
    tvm.ir.assert_structural_equal(merge_parallel_dense()(Before), expected)


def test_bert_qkv_merge_is_exact(tiny_config: Path) -> None:
    model = load_model(tiny_config)
    mod = relax.transform.FoldConstant()(import_bert(model.module, InputSpec(1, 16)))
    merged = merge_parallel_dense()(mod)
    text = merged["main"].script(show_meta=False)
    assert text.count("R.matmul(") == mod["main"].script(show_meta=False).count("R.matmul(") - 4
    data = {name: np.ones((1, 16), "int64") for name in ("ids", "mask", "types")}
    data["ids"] = RNG.integers(0, 1000, (1, 16))

    def run(module: tvm.IRModule) -> np.ndarray:
        vm = relax.VirtualMachine(tvm.compile(module, "llvm"), tvm.cpu())
        return vm["main"](*[tvm.runtime.tensor(v) for v in data.values()]).numpy()

    np.testing.assert_allclose(run(merged), run(mod), atol=1e-6)
