"""Dynamic-range int8: the VNNI kernel against its PyTorch reference, and int8 builds."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from canao.compiler.build import compile_model
from canao.compiler.importer import InputSpec
from canao.compiler.models import load_model
from canao.compiler.schedules import pack_dense
from canao.compiler.schedules.dense_int8 import (
    GROUP,
    Int8Tiling,
    dense_int8_primfunc,
    pack_int8_weight,
    padded,
    quantize_primfunc,
    quantize_rows,
    quantize_weight,
    reference_dense,
)
from canao.compiler.targets import get_target
from canao.compiler.verify import verify_locally
from canao.errors import NumericsMismatchError
from tests.conftest import write_config

# What each x86 kernel needs to run here (AVX-VNNI's 256-bit form also runs as EVEX on an
# AVX-512 VNNI + VL host). Tests that only compile run on any host.
HOST_FEATURES = {
    "avx512-vnni": (["avx512vnni", "avx512bw"],),
    "avx-vnni": (["avxvnni"], ["avx512vnni", "avx512vl"]),
    "avx2": (["avx2"],),
    "avx2-u7": (["avx2"],),
}


def host_runs(isa: str) -> bool:
    from tvm.target.codegen import llvm_cpu_has_features

    host = get_target("x86").tvm_target()
    return any(bool(llvm_cpu_has_features(need, host)) for need in HOST_FEATURES[isa])


def host_isa() -> str | None:
    """The int8 kernel canao picks for this host (None: no int8 path here)."""
    from canao.compiler.schedules.dense_int8 import int8_isa
    from canao.errors import CanaoError

    try:
        return int8_isa(get_target("x86").tvm_target())
    except CanaoError:
        return None


needs_int8_host = pytest.mark.skipif(host_isa() is None, reason="this CPU has no int8 path")


def run_kernel(
    x: np.ndarray, w: np.ndarray, b: np.ndarray, epilogue: str, isa: str = "avx512-vnni"
) -> tuple:
    """Quantize + int8 GEMM as the pass lays them out (K and N padded, the tile chosen for
    the shape); (output, asm)."""
    import tvm

    if not host_runs(isa):
        pytest.skip(f"this CPU cannot run the {isa} kernel")

    m, k = x.shape
    tiling = Int8Tiling.for_isa(isa).for_shape(m, padded(k, GROUP))
    n = w.shape[1]
    kp, wide = padded(k, GROUP), padded(n, tiling.nb)
    qw, sw = quantize_weight(w)
    target = get_target("x86").tvm_target()
    quant = tvm.compile(
        tvm.IRModule(
            {"main": quantize_primfunc(m, k, tiling.spec.activation_dtype, tiling.spec.levels)}
        ),
        target=target,
    )
    gemm = tvm.compile(
        tvm.IRModule({"main": dense_int8_primfunc(m, kp, wide, epilogue, tiling)}),
        target=target,
    )
    dev = tvm.cpu()
    qa = tvm.runtime.empty((m, kp), tiling.spec.activation_dtype, dev)
    sa, za = (tvm.runtime.empty((m,), "float32", dev) for _ in range(2))
    quant["main"](tvm.runtime.tensor(x, dev), qa, sa, za)
    padded_qw = np.pad(qw, ((0, 0), (0, wide - n)))
    args = [
        qa,
        sa,
        za,
        tvm.runtime.tensor(pack_int8_weight(padded_qw, tiling), dev),
        tvm.runtime.tensor(padded_qw.astype(np.int32).sum(0).astype(np.int32), dev),
        tvm.runtime.tensor(np.pad(sw, (0, wide - n), constant_values=1.0), dev),
    ]
    if epilogue != "none":
        args.append(tvm.runtime.tensor(np.pad(b, (0, wide - n)), dev))
    out = tvm.runtime.empty((m, wide), "float32", dev)
    gemm["main"](*args, out)
    bias = None if epilogue == "none" else b
    expected = reference_dense(torch.from_numpy(x), qw, sw, bias, epilogue, tiling.spec.levels)
    return out.numpy()[:, :n], expected.numpy(), gemm.mod.inspect_source("asm")  # type: ignore[union-attr]


AWKWARD_SHAPES = [
    (7, 30, 80, "bias"),  # M odd, K not a multiple of 4, N not whole 64-wide tiles
    (1, 384, 384, "bias"),  # the pooler's single row
    (12, 64, 192, "none"),
    (16, 96, 130, "bias_gelu"),
    (16, 770, 100, "bias_gelu"),  # a long reduction: the 8 x 48 tile on AVX-512 VNNI
]


def test_long_reductions_take_the_taller_tile() -> None:
    tiling = Int8Tiling()
    assert (tiling.for_shape(16, 772).mr, tiling.for_shape(16, 772).nb) == (8, 48)
    assert tiling.for_shape(16, 384) == tiling  # short reduction: 4 x 64
    assert tiling.for_shape(12, 772) == tiling  # M not whole 8-row tiles
    assert Int8Tiling.for_isa("avx2").for_shape(16, 772) == Int8Tiling.for_isa("avx2")


@pytest.mark.parametrize("isa", ["avx512-vnni", "avx-vnni", "avx2", "avx2-u7"])
@pytest.mark.parametrize(("m", "k", "n", "epilogue"), AWKWARD_SHAPES)
def test_int8_kernel_matches_its_reference_on_awkward_shapes(
    m: int, k: int, n: int, epilogue: str, isa: str
) -> None:
    rng = np.random.default_rng(m * 1000 + k + n)
    x = (rng.standard_normal((m, k)) * 2 + 0.3).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.1).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    got, expected, asm = run_kernel(x, w, b, epilogue, isa)
    # Exact integer sums on both sides: only the final float scaling rounds differently.
    np.testing.assert_allclose(got, expected, atol=1e-5 * max(1.0, np.abs(expected).max()))
    register = {"avx512-vnni": "zmm", "avx-vnni": "ymm"}.get(isa)
    if isa == "avx2":  # int16 pair products (vpmaddwd) on widened weights, no VNNI
        assert "vpdpbusd" not in asm
        assert re.search(r"^\s*vpmaddwd\s.*%ymm\d+$", asm, re.MULTILINE)
        assert re.search(r"^\s*vpmovsxbw\s", asm, re.MULTILINE)  # weights stay int8 in memory
    elif isa == "avx2-u7":  # uint7 x int8 pairs (vpmaddubsw), summed by vpmaddwd
        assert "vpdpbusd" not in asm and "vpmovsxbw" not in asm
        assert re.search(r"^\s*vpmaddubsw\s.*%ymm\d+$", asm, re.MULTILINE)
    else:  # the VNNI instruction at this width (its accumulator, the last operand), not a
        # scalar or pmaddubsw fallback; the weights may come straight from memory
        assert re.search(rf"^\s*vpdpbusd\s.*%{register}\d+$", asm, re.MULTILINE), isa
    fp32 = x @ w + (0 if epilogue == "none" else b)
    if epilogue == "bias_gelu":
        fp32 = torch.nn.functional.gelu(torch.from_numpy(fp32)).numpy()
    # And it is a quantization of the fp32 product, not some other function.
    assert np.abs(got - fp32).max() < 0.05 * np.abs(fp32).max()


@pytest.mark.parametrize(
    ("dtype", "levels"), [("uint8", 255), ("int8", 255), ("int16", 255), ("uint8", 127)]
)
def test_activation_quantization_is_exact(dtype: str, levels: int) -> None:
    import tvm

    x = np.random.default_rng(0).standard_normal((5, 30)).astype(np.float32)
    x[2] = np.abs(x[2])  # a row with no negative value: the zero point is 0
    x[3] = 0.0  # an all-zero row: scale 1, nothing divides by zero
    lib = tvm.compile(
        tvm.IRModule({"main": quantize_primfunc(5, 30, dtype, levels)}),
        get_target("x86").tvm_target(),
    )
    dev = tvm.cpu()
    qa = tvm.runtime.empty((5, 32), dtype, dev)
    sa, za = (tvm.runtime.empty((5,), "float32", dev) for _ in range(2))
    lib["main"](tvm.runtime.tensor(x, dev), qa, sa, za)
    q, scale, zero = quantize_rows(torch.from_numpy(x), levels)
    assert int(q.max()) == levels  # each row's extreme is the top level
    shift = 128 if dtype == "int8" else 0  # sdot's signed storage: qa - 128
    assert np.array_equal(qa.numpy()[:, :30].astype(np.int32) + shift, q.numpy().astype(np.int32))
    assert not qa.numpy()[:, 30:].any()  # K padding is zero
    np.testing.assert_array_equal(sa.numpy(), scale.numpy())
    np.testing.assert_array_equal(za.numpy(), zero.numpy())
    assert za.numpy()[2] == 0 and sa.numpy()[3] == 1.0


@needs_int8_host
def test_int8_build_is_checked_against_the_same_scheme_in_pytorch(tmp_path: Path) -> None:
    from canao.compiler.schedules.dense_int8 import ISAS
    from canao.compiler.schedules.pack_dense import quantized_name

    isa = host_isa()
    assert isa is not None
    model = load_model(write_config(tmp_path, intermediate_size=160), head="classification")
    compiled = compile_model(model, "x86", "fast-int8", InputSpec(1, 24))
    names = [gv.name_hint for gv in compiled.lowered.functions]
    kernel = f"canao_dense_int8_{isa.replace('-', '_')}_bias_gelu"
    assert any(name.startswith(kernel) for name in names), names
    stored = quantized_name(ISAS[isa].activation_dtype, ISAS[isa].levels)
    assert any(name.startswith(f"canao_quantize_{stored}") for name in names)
    numerics = verify_locally(compiled)
    assert numerics["max_abs_diff"] <= numerics["tolerance"]
    assert numerics["fp32_max_abs_diff"] > 0  # lossy, and reported as such
    assert "quantized" in str(numerics["reference"])


@needs_int8_host
def test_a_wrong_int8_kernel_fails_the_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Weights scaled 10% off (a wrong per-channel scale) must not pass as quantization noise."""
    real = pack_dense.quantize_weight

    def off_by_ten_percent(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        q, scale = real(weight)
        return q, (scale * np.float32(1.1)).astype(np.float32)

    monkeypatch.setattr(pack_dense, "quantize_weight", off_by_ten_percent)
    model = load_model(write_config(tmp_path), head="base")
    compiled = compile_model(model, "x86", "fast-int8", InputSpec(1, 24))
    with pytest.raises(NumericsMismatchError, match="exceeds tolerance"):
        verify_locally(compiled)


@needs_int8_host
def test_compile_with_precision_int8_reports_both_distances(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from canao.cli import main

    model = write_config(tmp_path)
    out = tmp_path / "built"
    args = ["compile", str(model), "--seq", "16", "--precision", "int8", "-o", str(out)]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "(fast-int8)" in printed and "the quantization error" in printed
    assert f"int8 kernel: {host_isa()}," in printed
    manifest = json.loads((out / "manifest.json").read_text())
    bits = 7 if host_isa() == "avx2-u7" else 8
    assert manifest["int8"] == {"kernel": host_isa(), "activation_bits": bits}
    bad = ["compile", str(model), "--precision", "int8", "--pipeline", "default", "-o", str(out)]
    assert main(bad) == 2
    assert "drop --pipeline default" in capsys.readouterr().err


def test_an_int8_search_scores_candidates_quantized(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from canao.nas import job as job_module
    from canao.nas.job import SearchJob, SupernetEvaluator
    from tests.tiny_teacher import toy_supernet

    assert SearchJob(precision="int8").pipeline == "fast-int8"
    assert SearchJob().pipeline == "fast"
    supernet, train = toy_supernet(tmp_path, examples=16)
    quantized: list[object] = []
    real = job_module.quantized_reference
    monkeypatch.setattr(
        job_module, "quantized_reference", lambda m, t: quantized.append(t) or real(m, t)
    )
    arch = supernet.space.smallest()
    fp32 = SupernetEvaluator(supernet, train, latency_evaluator=None)  # type: ignore[arg-type]
    scheme = Int8Tiling.for_isa("avx2-u7")
    int8 = SupernetEvaluator(supernet, train, latency_evaluator=None, int8=scheme)  # type: ignore[arg-type]
    fp32.metrics(arch)
    assert quantized == []
    int8.metrics(arch)
    assert quantized == [scheme]  # scored through the same-scheme int8 model, cached apart
    int8.metrics(arch)
    assert len(quantized) == 1
    full_range = Int8Tiling.for_isa("avx2")
    SupernetEvaluator(supernet, train, latency_evaluator=None, int8=full_range).metrics(arch)  # type: ignore[arg-type]
    assert quantized == [scheme, full_range]  # 7-bit and 8-bit activations: cached apart


@pytest.mark.parametrize(
    ("target", "isa"),
    [
        ({"mcpu": "sapphirerapids"}, "avx512-vnni"),
        ({"mcpu": "alderlake"}, "avx-vnni"),  # AVX-VNNI, no AVX-512
        ({"mcpu": "haswell"}, "avx2-u7"),  # full range: "avx2" (the test below)
        ({"mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod", "+i8mm"]}, "neon-i8mm"),
        ({"mtriple": "aarch64-linux-gnu", "mattr": ["+neon", "+dotprod"]}, "neon-dot"),
        ({"mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]}, "neon"),
    ],
)
def test_the_int8_kernel_follows_the_targets_features(target: dict, isa: str) -> None:
    import tvm

    from canao.compiler.schedules.dense_int8 import int8_tiling

    tiling = int8_tiling(tvm.target.Target({"kind": "llvm", **target}))
    assert tiling.isa == isa
    assert tiling.nb % tiling.lanes == 0


def test_full_range_int8_keeps_8_bit_activations_on_every_cpu() -> None:
    import tvm

    from canao.compiler.pipelines import int8_full_range
    from canao.compiler.schedules.dense_int8 import int8_tiling

    def isa(full_range: bool, **target: object) -> str:
        spec = {"kind": "llvm", **target}
        return int8_tiling(tvm.target.Target(spec), full_range).isa

    assert isa(True, mcpu="haswell") == "avx2"
    assert isa(True, mcpu="sapphirerapids") == isa(False, mcpu="sapphirerapids")
    assert int8_full_range("fast-int8-full-range") and not int8_full_range("fast-int8")


def test_avx_vnni_kernel_is_vex_encoded_for_a_cpu_without_avx512() -> None:
    import tvm

    tiling = Int8Tiling.for_isa("avx-vnni")
    func = dense_int8_primfunc(4, 64, 32, "bias", tiling)
    lib = tvm.compile(
        tvm.IRModule({"main": func}),
        target=tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"}),
    )
    asm = lib.mod.inspect_source("asm")  # type: ignore[union-attr]
    assert "vpdpbusd" in asm and "zmm" not in asm


def haswell_asm(tiling: Int8Tiling) -> tuple[str, Callable[[str], int]]:
    """A 4 x 64 GELU dense kernel of ``tiling`` compiled for Haswell (AVX2, no VNNI),
    whatever this host has: (its assembly, instruction name -> how many times it appears)."""
    import tvm

    func = dense_int8_primfunc(4, 64, tiling.nb, "bias_gelu", tiling)
    lib = tvm.compile(
        tvm.IRModule({"main": func}),
        target=tvm.target.Target({"kind": "llvm", "mcpu": "haswell"}),
    )
    asm = lib.mod.inspect_source("asm")  # type: ignore[union-attr]
    return asm, lambda op: len(re.findall(rf"^\s*{op}\s", asm, re.MULTILINE))


def test_avx2_kernel_is_pair_products_on_int8_weights_for_a_cpu_without_vnni() -> None:
    """vpmaddwd on the int16 activations and the widened weights, each weight load used by
    every row."""
    tiling = Int8Tiling.for_isa("avx2")
    assert (tiling.group, tiling.spec.activation_dtype) == (2, "int16")
    asm, count = haswell_asm(tiling)
    assert "vpdpbusd" not in asm and "zmm" not in asm
    madds = count("vpmaddwd")
    assert madds > 0 and madds == tiling.mr * count("vpmovsxbw")  # a widening per panel


def test_avx2_7bit_kernel_is_byte_products_summed_by_pairs() -> None:
    """vpmaddubsw on the int8 weights as stored (no widening), then vpmaddwd by ones, as
    many of each."""
    tiling = Int8Tiling.for_isa("avx2-u7")
    assert (tiling.group, tiling.spec.activation_dtype, tiling.spec.levels) == (4, "uint8", 127)
    asm, count = haswell_asm(tiling)
    assert "vpdpbusd" not in asm and "zmm" not in asm and "vpmovsxbw" not in asm
    assert count("vpmaddubsw") > 0 and count("vpmaddubsw") == count("vpmaddwd")


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_avx2_7bit_kernel_is_exact_where_full_range_bytes_would_saturate(sign: float) -> None:
    """Every activation at the top level (127) against weights at +-127: each vpmaddubsw
    pair is +-32258, next to int16's limit (255 would give 64770 and saturate)."""
    m, k, n = 4, 64, 16
    x = np.full((m, k), 3.0, np.float32)  # a row of one positive value: all 127
    w = np.full((k, n), sign * 0.02, np.float32)  # one value per column: all +-127
    got, expected, _ = run_kernel(x, w, np.zeros(n, np.float32), "none", "avx2-u7")
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    np.testing.assert_allclose(got, x @ w, rtol=1e-3)  # 127 x 127 x 64, scaled back


def test_int8_on_a_cpu_without_avx2_fails_before_training() -> None:
    import tvm

    from canao.compiler.schedules.dense_int8 import int8_tiling
    from canao.errors import CanaoError

    with pytest.raises(CanaoError, match="AVX2, AVX-VNNI, AVX-512 VNNI or aarch64"):
        int8_tiling(tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"}))


@pytest.mark.parametrize(
    ("isa", "mattr", "instruction"),
    [
        ("neon-i8mm", ["+neon", "+i8mm"], "usdot"),
        ("neon-dot", ["+neon", "+dotprod"], "sdot"),
        ("neon", ["+neon"], None),
    ],
)
def test_aarch64_int8_kernel_uses_the_dot_instruction_the_cpu_has(
    isa: str, mattr: list[str], instruction: str | None
) -> None:
    import tvm

    target = tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr})
    tiling = Int8Tiling.for_isa(isa)
    quant = quantize_primfunc(4, 64, tiling.spec.activation_dtype)
    gemm = dense_int8_primfunc(4, 64, tiling.nb, "bias_gelu", tiling)
    funcs = {"quant": quant.with_attr("global_symbol", "quant"), "main": gemm}
    lib = tvm.compile(tvm.IRModule(funcs), target=target)
    asm = lib.mod.inspect_source("asm")  # type: ignore[union-attr]
    if instruction is None:
        assert "sdot" not in asm and "usdot" not in asm
    else:
        assert re.search(rf"\b{instruction}\b", asm), isa


def test_int8_bound_has_a_floor_where_pooled_noise_cancels() -> None:
    from canao.compiler.quantized import INT8_ATOL, NOISE_FACTOR, NOISE_FLOOR, int8_bound

    logits = np.array([1.0, -1.0])
    # The reference's own quantization error happened to be tiny: the floor decides.
    assert int8_bound(logits, 1e-4) == pytest.approx(INT8_ATOL + NOISE_FACTOR * NOISE_FLOOR)
    # Hidden states (many values) keep the measured noise, however small.
    hidden = np.ones((16, 64))
    assert int8_bound(hidden, 1e-4) == pytest.approx(INT8_ATOL + NOISE_FACTOR * 1e-4)
