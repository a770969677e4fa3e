"""canao.fusion.residual_layernorm: structure (Before/Expected) and exact numerics."""

from __future__ import annotations

import numpy as np
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from canao.fusion.residual_layernorm import _primfunc, fuse_residual_layer_norm


@I.ir_module
class Before:
    @R.function
    def main(
        x: R.Tensor((2, 5, 16), "float32"),
        r: R.Tensor((2, 5, 16), "float32"),
        g: R.Tensor((16,), "float32"),
        b: R.Tensor((16,), "float32"),
    ) -> R.Tensor((2, 5, 16), "float32"):
        with R.dataflow():
            s = R.add(x, r)
            n = R.nn.layer_norm(s, g, b, axes=[-1], epsilon=1e-12)
            R.output(n)
        return n


def _expected() -> tvm.IRModule:
    """One call_tir of the fused kernel, built the way the pass builds it."""
    params = [relax.Var(name, Before["main"].params[i].ty) for i, name in enumerate("xrgb")]
    builder = relax.BlockBuilder()
    with builder.function("main", params):
        with builder.dataflow():
            kernel = builder.add_func(_primfunc(*params, 1e-12), "canao_add_layer_norm_2x5x16")
            out = builder.emit_output(
                relax.call_tir(kernel, params, relax.TensorType((2, 5, 16), "float32"))
            )
        builder.emit_func_output(out)
    return builder.get()


def test_structure() -> None:
    after = fuse_residual_layer_norm()(Before)
    tvm.ir.assert_structural_equal(after["main"], _expected()["main"], map_free_vars=True)
    assert "R.nn.layer_norm" not in after["main"].script()


def test_numerics_match_the_unfused_graph() -> None:
    rng = np.random.default_rng(0)
    data = [rng.standard_normal(s).astype(np.float32) * 3 for s in ((2, 5, 16),) * 2]
    data += [rng.standard_normal(16).astype(np.float32) for _ in range(2)]

    def run(mod: tvm.IRModule) -> np.ndarray:
        vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
        return vm["main"](*[tvm.runtime.tensor(d) for d in data]).numpy()

    np.testing.assert_allclose(run(fuse_residual_layer_norm()(Before)), run(Before), atol=2e-6)


def test_broadcasting_add_is_left_alone() -> None:
    @I.ir_module
    class Broadcast:
        @R.function
        def main(
            x: R.Tensor((2, 5, 16), "float32"),
            r: R.Tensor((16,), "float32"),
            g: R.Tensor((16,), "float32"),
            b: R.Tensor((16,), "float32"),
        ) -> R.Tensor((2, 5, 16), "float32"):
            with R.dataflow():
                s = R.add(x, r)
                n = R.nn.layer_norm(s, g, b, axes=[-1])
                R.output(n)
            return n

    tvm.ir.assert_structural_equal(fuse_residual_layer_norm()(Broadcast), Broadcast)
