"""The opt-in lossy polynomials (pipeline fast-approx): their stated error bounds hold."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import tvm
from tvm import te

from canao.compiler.build import compile_model
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs, torch_reference
from canao.compiler.models import load_model
from canao.compiler.schedules.vector_math import erf_poly, exp_poly, gelu_poly
from canao.compiler.targets import get_target
from canao.latency.runner import local_runner

X86 = get_target("x86").tvm_target()


def _evaluate(expr: object, points: np.ndarray) -> np.ndarray:
    x = te.placeholder(points.shape, "float32", name="x")
    y = te.compute(points.shape, lambda i: expr(x[i]), name="y")
    lib = tvm.compile(tvm.IRModule({"main": te.create_prim_func([x, y])}), target=X86).jit()
    out = tvm.runtime.tensor(np.zeros_like(points))
    lib["main"](tvm.runtime.tensor(points), out)
    return out.numpy()


def test_gelu_poly_bound() -> None:
    points = np.linspace(-10, 10, 40001, dtype=np.float32)
    wide = points.astype(np.float64)
    exact = 0.5 * wide * (1 + np.vectorize(math.erf)(wide / math.sqrt(2)))
    assert np.abs(_evaluate(gelu_poly, points) - exact).max() <= 1.9e-2
    erf_error = np.abs(_evaluate(erf_poly, points) - np.vectorize(math.erf)(wide)).max()
    assert erf_error <= 9.7e-2


def test_exp_poly_bound_on_softmax_range() -> None:
    points = np.linspace(-80, 0, 40001, dtype=np.float32)
    exact = np.exp(points.astype(np.float64))
    assert (np.abs(_evaluate(exp_poly, points) / exact - 1)).max() <= 4e-3


def test_fast_approx_runs_close_to_pytorch(tiny_config: Path) -> None:
    model = load_model(tiny_config)
    compiled = compile_model(model, "x86", "fast-approx", InputSpec(1, 32))
    inputs = example_inputs(1000, 1, 32)
    output = local_runner(compiled.executable).run(inputs, INPUT_NAMES)
    reference = torch_reference(model.module, inputs)
    diff = np.abs(output - reference).max()
    assert 1e-5 < diff < 0.1  # lossy on purpose, but close
