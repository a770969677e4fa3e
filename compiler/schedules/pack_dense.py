"""Relax pass: dense layers with constant weights -> pre-packed GEMM kernels.

Rewrites ``matmul(x, W)`` with ``W`` a constant ``[K, N]`` -- with the bias
add and, when present, the GELU that follow it -- into one ``call_tir`` of a
scheduled kernel from :mod:`canao.compiler.schedules.dense`, with ``W``
packed into panels at build time. One kernel is generated per distinct
(shape, epilogue) and shared by every layer that has it.

Where it runs: after ``FoldConstant`` (which turns the importer's
``permute_dims(weight)`` into a constant ``W``) and before ``LegalizeOps``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from canao.compiler.schedules.dense import DenseTiling, dense_primfunc, pack_weight
from canao.compiler.schedules.dense_int8 import (
    GROUP,
    Int8Tiling,
    dense_int8_primfunc,
    int8_packs,
    pack_int8_weight,
    padded,
    quantize_primfunc,
    quantize_weight,
)


def _static_shape(expr: Any) -> tuple[int, ...] | None:
    from tvm import relax

    sinfo = expr.ty  # TVM 0.27's name for struct_info
    if not isinstance(sinfo, relax.TensorType) or sinfo.shape is None:
        return None
    try:
        return tuple(int(dim) for dim in sinfo.shape.values)
    except (TypeError, AttributeError):
        return None  # symbolic dimension


def _patterns() -> dict[str, Any]:
    from tvm.relax.dpl import is_const, is_op, wildcard

    x, w, b = wildcard(), is_const(), is_const()
    mm = is_op("relax.matmul")(x, w)
    biased = is_op("relax.add")(b, mm) | is_op("relax.add")(mm, b)
    reshaped = is_op("relax.reshape")(biased, wildcard())
    gelu = is_op("relax.nn.gelu")(reshaped) | is_op("relax.nn.gelu")(biased)
    return {"x": x, "w": w, "b": b, "mm": mm, "biased": biased, "gelu": gelu}


class _Rewriter:
    def __init__(
        self,
        tiling: DenseTiling,
        builder: Any,
        approximate: bool = False,
        int8: Int8Tiling | None = None,
    ) -> None:
        self.tiling = tiling
        self.approximate = approximate
        self.int8 = int8  # dynamic-range int8 kernels instead of fp32 ones (dense_int8)
        self.builder = builder  # relax.BlockBuilder over the module: gives typed GlobalVars
        self.kernels: dict[tuple[object, ...], Any] = {}  # -> GlobalVar
        self.p = _patterns()

    def add(self, key: tuple[object, ...], name: str, make: Any) -> Any:
        if key not in self.kernels:
            # TE names every function "main"; a module needs distinct symbols.
            self.kernels[key] = self.builder.add_func(make().with_attr("global_symbol", name), name)
        return self.kernels[key]

    def kernel(self, m: int, k: int, n: int, epilogue: str) -> Any:
        return self.add(
            (m, k, n, epilogue),
            f"canao_dense_{epilogue}{'_poly' if self.approximate else ''}_{m}x{k}x{n}",
            lambda: dense_primfunc(m, k, n, epilogue, self.tiling, self.approximate),
        )

    def rewrite(self, expr: Any, matches: dict[Any, Any], epilogue: str) -> Any:
        from tvm import relax

        x, w = matches[self.p["x"]], matches[self.p["w"]]
        x_shape, w_shape = _static_shape(x), _static_shape(w)
        out_shape = _static_shape(expr)
        if (
            x_shape is None
            or w_shape is None
            or out_shape is None
            or len(w_shape) != 2
            or x.ty.dtype != "float32"
            or w.ty.dtype != "float32"
            or not self.tiling.packs(w_shape[1])
        ):
            return expr  # not a shape this kernel handles: leave it to the generic path
        k, n = w_shape
        m = int(np.prod(x_shape[:-1]))
        if self.int8 is not None and int8_packs(n, self.int8):
            x2 = relax.op.reshape(x, (m, k)) if len(x_shape) != 2 else x
            bias = matches[self.p["b"]].value.numpy() if epilogue != "none" else None
            if bias is not None and bias.size != n:
                return expr
            call = self.int8_dense(x2, w.value.numpy(), bias, m, k, n, epilogue)
            return call if out_shape == (m, n) else relax.op.reshape(call, out_shape)
        # An N that is not whole panels (a pruned FFN: 1302) gets zero columns up to the
        # next panel and is sliced back: the generic path is ~10x slower than the waste.
        wide = self.tiling.padded(n)
        args = [relax.op.reshape(x, (m, k)) if len(x_shape) != 2 else x]
        weight = np.pad(w.value.numpy(), ((0, 0), (0, wide - n)))
        args.append(relax.const(pack_weight(weight, self.tiling.nb)))
        if epilogue != "none":
            bias = matches[self.p["b"]].value.numpy()
            if bias.size != n:
                return expr
            args.append(relax.const(np.pad(bias.reshape(n), (0, wide - n)).astype(np.float32)))
        call = relax.call_tir(
            self.kernel(m, k, wide, epilogue), args, relax.TensorType((m, wide), "float32")
        )
        if wide != n:  # bias and GELU of a zero column are zero, and it is dropped here
            call = relax.op.strided_slice(call, axes=[1], begin=[0], end=[n])
        return call if out_shape == (m, n) else relax.op.reshape(call, out_shape)

    def int8_dense(
        self,
        x: Any,
        weight: np.ndarray,
        bias: np.ndarray | None,
        m: int,
        k: int,
        n: int,
        epilogue: str,
    ) -> Any:
        """Quantize ``x`` per row, then one int8 GEMM with dequant/bias/GELU in its write-back."""
        from tvm import relax

        assert self.int8 is not None
        kp = padded(k, GROUP)
        tiling = self.int8.for_shape(m, kp)
        wide = padded(n, tiling.nb)
        qw, sw = quantize_weight(weight)
        qw = np.pad(qw, ((0, 0), (0, wide - n)))  # zero columns: sliced off below
        sw = np.pad(sw, (0, wide - n), constant_values=1.0).astype(np.float32)
        stored, levels = tiling.spec.activation_dtype, tiling.spec.levels
        quantize = self.add(
            ("q8", m, k, stored, levels),
            f"canao_quantize_{quantized_name(stored, levels)}_{m}x{k}",
            lambda: quantize_primfunc(m, k, stored, levels),
        )
        rows = relax.TensorType((m,), "float32")
        q = relax.call_tir(quantize, [x], [relax.TensorType((m, kp), stored), rows, rows])
        args = [
            relax.TupleGetItem(q, 0),
            relax.TupleGetItem(q, 1),
            relax.TupleGetItem(q, 2),
            relax.const(pack_int8_weight(qw, tiling)),
            relax.const(qw.astype(np.int32).sum(0).astype(np.int32)),
            relax.const(sw),
        ]
        if bias is not None:
            args.append(relax.const(np.pad(bias.reshape(n), (0, wide - n)).astype(np.float32)))
        kernel = self.add(
            ("i8", m, kp, wide, epilogue, tiling),
            f"canao_dense_int8_{tiling.isa.replace('-', '_')}_{epilogue}_{m}x{kp}x{wide}",
            lambda: dense_int8_primfunc(m, kp, wide, epilogue, tiling),
        )
        call = relax.call_tir(kernel, args, relax.TensorType((m, wide), "float32"))
        if wide != n:
            call = relax.op.strided_slice(call, axes=[1], begin=[0], end=[n])
        return call


STORED_NAMES = {"uint8": "u8", "int8": "s8", "int16": "i16"}  # quantize kernels by what they store


def quantized_name(stored: str, levels: int) -> str:
    """``u8``, ``s8``, ``i16``; ``u7`` for uint8 activations of 127 levels (AVX2's 7-bit)."""
    return "u7" if (stored, levels) == ("uint8", 127) else STORED_NAMES[stored]


def pack_dense_weights(
    tiling: DenseTiling,
    fuse_epilogues: bool = True,
    approximate: bool = False,
    int8: Int8Tiling | None = None,
) -> Any:
    """The pass (a ``tvm.transform.Pass``) for one register tiling.

    ``fuse_epilogues=False`` packs the matrix product alone and leaves bias and
    GELU to TVM's FuseOps (which cannot merge them into the opaque kernel): the
    "TVM fusion, canao schedules" baseline that canao's fusion is measured against.
    """
    import tvm
    from tvm import relax
    from tvm.relax.dpl import rewrite_call

    @tvm.transform.module_pass(opt_level=0, name="canao.PackDenseWeights")
    def transform(mod: Any, _ctx: Any) -> Any:
        builder = relax.BlockBuilder(mod)
        rewriter = _Rewriter(tiling, builder, approximate, int8)
        # Longest pattern first, so a GELU layer becomes one kernel, not dense + GELU.
        order = (("gelu", "bias_gelu"), ("biased", "bias"), ("mm", "none"))
        if not fuse_epilogues:
            order = (("mm", "none"),)
        updated = {}
        for gvar, func in list(mod.functions.items()):
            if not isinstance(func, relax.Function):
                continue
            for pattern_name, epilogue in order:
                func = rewrite_call(
                    rewriter.p[pattern_name],
                    lambda expr, matches, ep=epilogue: rewriter.rewrite(expr, matches, ep),
                    func,
                )
            updated[gvar] = func
        for gvar, func in updated.items():
            builder.update_func(gvar, func)
        return builder.get()

    return transform
