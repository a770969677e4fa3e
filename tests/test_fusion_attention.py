"""canao.fusion.attention and its kernel: structure (Before/Expected), exact numerics, bounds."""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from tvm import relax
from tvm.script import ir as I
from tvm.script import relax as R

from canao.compiler.schedules.attention import AttentionShape, attention_primfunc
from canao.fusion.attention import fuse_attention

FLT_MIN = float(np.finfo(np.float32).min)  # HF's additive mask value


# B=2, S=16, H=2, D=8 (W = 16), laid out as the exporter writes one BERT attention block
# after merge_parallel_dense: Q, K, V are column slices of one [B*S, 3W] product.
@I.ir_module
class Before:
    @R.function
    def main(
        qkv: R.Tensor((32, 48), "float32"), mask: R.Tensor((2, 1, 16, 16), "float32")
    ) -> R.Tensor((32, 16), "float32"):
        with R.dataflow():
            qs = R.strided_slice(qkv, (1,), (0,), (16,))
            ks = R.strided_slice(qkv, (1,), (16,), (32,))
            vs = R.strided_slice(qkv, (1,), (32,), (48,))
            q4 = R.reshape(qs, R.shape([2, 16, 2, 8]))
            qt = R.permute_dims(q4, axes=[0, 2, 1, 3])
            q = R.reshape(qt, R.shape([4, 16, 8]))
            k4 = R.reshape(ks, R.shape([2, 16, 2, 8]))
            kt = R.permute_dims(k4, axes=[0, 2, 3, 1])
            k = R.reshape(kt, R.shape([4, 8, 16]))
            v4 = R.reshape(vs, R.shape([2, 16, 2, 8]))
            vt = R.permute_dims(v4, axes=[0, 2, 1, 3])
            v = R.reshape(vt, R.shape([4, 16, 8]))
            s3 = R.matmul(q, k, out_dtype="float32")
            s = R.reshape(s3, R.shape([2, 2, 16, 16]))
            masked = R.add(s, mask)
            p = R.nn.softmax(masked, axis=-1)
            # PyTorch SDPA: a row whose every score is -inf gives zeros, not NaN
            is_inf = R.equal(masked, R.const(float("-inf"), "float32"))
            finite = R.logical_not(is_inf)
            finite8 = R.astype(finite, "int8")
            any8 = R.max(finite8, axis=[-1], keepdims=True)
            any_finite = R.astype(any8, "bool")
            all_masked = R.logical_not(any_finite)
            guarded = R.where(all_masked, R.const(0.0, "float32"), p)
            p3 = R.reshape(guarded, R.shape([4, 16, 16]))
            o3 = R.matmul(p3, v, out_dtype="float32")
            o4 = R.reshape(o3, R.shape([2, 2, 16, 8]))
            ot = R.permute_dims(o4, axes=[0, 2, 1, 3])
            out = R.reshape(ot, R.shape([32, 16]))
            R.output(out)
        return out


SHAPE = AttentionShape(2, 16, 2, 8, 48, 48, 48, 0, 16, 32, (2, 1, 16, 16))


def _expected() -> tvm.IRModule:
    """One call_tir of the attention kernel on the projection itself, built as the pass does."""
    qkv, mask = (relax.Var(p.name, p.ty) for p in Before["main"].params)
    params = [qkv, mask]
    builder = relax.BlockBuilder()
    with builder.function("main", params):
        with builder.dataflow():
            kernel = builder.add_func(attention_primfunc(SHAPE, 16), SHAPE.name())
            call = builder.emit(
                relax.call_tir(
                    kernel, [qkv, qkv, qkv, mask], relax.TensorType((2, 16, 2, 8), "float32")
                )
            )
            out = builder.emit_output(relax.op.reshape(call, (32, 16)))
        builder.emit_func_output(out)
    return builder.get()


def _masks() -> np.ndarray:
    mask = np.zeros((2, 1, 16, 16), np.float32)
    mask[1, :, :, 12:] = FLT_MIN  # padding of the second sentence, as BERT's mask
    mask[0, :, 3, :] = -np.inf  # a fully masked row: the SDPA guard's zeros
    return mask


def _run(mod: tvm.IRModule, *data: np.ndarray) -> np.ndarray:
    vm = relax.VirtualMachine(tvm.compile(mod, "llvm"), tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(d) for d in data]).numpy()


def test_structure() -> None:
    after = fuse_attention(16)(Before)
    tvm.ir.assert_structural_equal(after["main"], _expected()["main"], map_free_vars=True)
    text = after["main"].script()
    assert "R.matmul" not in text and "R.nn.softmax" not in text and "permute_dims" not in text


def test_numerics_match_the_unfused_graph() -> None:
    qkv = np.random.default_rng(0).standard_normal((32, 48)).astype(np.float32) * 2
    mask = _masks()
    fused = _run(fuse_attention(16)(Before), qkv, mask)
    np.testing.assert_allclose(fused, _run(Before, qkv, mask), atol=2e-6, rtol=1e-5)
    assert (fused.reshape(2, 16, 16)[0, 3] == 0).all()  # the guarded row


def _reference(shape: AttentionShape, q, k, v, mask) -> np.ndarray:
    b, s, h, d = shape.batch, shape.seq, shape.heads, shape.head_dim

    def heads(src: np.ndarray, offset: int) -> np.ndarray:
        return src[:, offset : offset + h * d].reshape(b, s, h, d).transpose(0, 2, 1, 3)

    scores = heads(q, shape.q_offset) @ heads(k, shape.k_offset).transpose(0, 1, 3, 2) + mask
    scores = scores.astype(np.float64)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return (probs @ heads(v, shape.v_offset)).transpose(0, 2, 1, 3)


@pytest.mark.parametrize(
    "shape",
    [
        # separate Q/K/V tensors, a sequence that is not whole tiles, one mask per batch
        AttentionShape(2, 12, 3, 4, 12, 20, 12, 0, 8, 0, (2, 1, 1, 12)),
        # long sequence: the scores take a heap workspace instead of the stack
        AttentionShape(1, 288, 2, 16, 96, 96, 96, 0, 32, 64, (1, 1, 1, 288)),
    ],
    ids=["ragged", "long"],
)
@pytest.mark.parametrize("approximate", [False, True], ids=["exact", "poly-exp"])
def test_kernel_against_numpy(shape: AttentionShape, approximate: bool) -> None:
    rng = np.random.default_rng(1)
    rows = shape.batch * shape.seq
    q, k, v = (
        rng.standard_normal((rows, w)).astype(np.float32)
        for w in (shape.q_width, shape.k_width, shape.v_width)
    )
    mask = np.zeros(shape.mask_shape, np.float32)
    mask[..., -3:] = FLT_MIN
    kernel = attention_primfunc(shape, 16, approximate)
    lib = tvm.compile(tvm.IRModule({"attention": kernel}))
    out = np.zeros((shape.batch, shape.seq, shape.heads, shape.head_dim), np.float32)
    args = [tvm.runtime.tensor(a) for a in (q, k, v, mask, out)]
    lib[str(kernel.attrs["global_symbol"])](*args)
    out = args[-1].numpy()
    # exact: float rounding only; poly-exp: exp_poly's 4e-3 relative bound, averaged by P @ V
    tolerance = 1e-2 if approximate else 2e-5
    np.testing.assert_allclose(out, _reference(shape, q, k, v, mask), atol=tolerance)


@pytest.mark.parametrize("lanes", [16, 8, 4], ids=["avx512", "avx2", "neon"])
def test_tile_heights_follow_the_register_budget(lanes: int) -> None:
    """D=64 heads: P @ V takes the tile that loads least per FMA within the budget (AVX2:
    4 rows x 16 columns in four passes over D, not one 64-wide row); results do not
    depend on it."""
    from canao.compiler.schedules.attention import _output_tile

    expected = {16: (4, 64), 8: (4, 16), 4: (4, 16)}[lanes]
    assert _output_tile(32, 64, lanes, 16 if lanes != 8 else 8) == expected
    assert _output_tile(7, 64, 8, 8) == (1, 64)  # no row count divides 7: one row at a time
    shape = AttentionShape(1, 32, 2, 64, 384, 384, 384, 0, 128, 256, (1, 1, 1, 32))
    rng = np.random.default_rng(2)
    q, k, v = (rng.standard_normal((32, 384)).astype(np.float32) for _ in range(3))
    mask = np.zeros(shape.mask_shape, np.float32)
    kernel = attention_primfunc(shape, lanes)
    lib = tvm.compile(tvm.IRModule({"attention": kernel}))
    out = np.zeros((1, 32, 2, 64), np.float32)
    args = [tvm.runtime.tensor(a) for a in (q, k, v, mask, out)]
    lib[str(kernel.attrs["global_symbol"])](*args)
    np.testing.assert_allclose(args[-1].numpy(), _reference(shape, q, k, v, mask), atol=2e-5)


def test_scale_left_between_the_products_is_not_fused() -> None:
    """A graph that is not exactly the attention pattern stays as it was."""
    text = (
        Before.script()
        .replace('R.const("-inf"', 'R.const(float("-inf")')  # the printer's form does not parse
        .replace(" = R.add(s, mask)", ' = R.add(R.multiply(s, R.const(0.5, "float32")), mask)')
    )
    assert "R.multiply" in text
    scaled = tvm.script.from_source(text)
    tvm.ir.assert_structural_equal(fuse_attention(16)(scaled), scaled)


def test_mask_that_does_not_broadcast_is_rejected() -> None:
    with pytest.raises(ValueError, match="does not broadcast"):
        AttentionShape(2, 16, 2, 8, 48, 48, 48, 0, 16, 32, (3, 1, 16, 16))
    with pytest.raises(ValueError, match="exceed width"):
        AttentionShape(2, 16, 2, 8, 40, 48, 48, 32, 16, 32, (1, 1, 1, 16))
