"""Numerics: every build is run once and compared with PyTorch.

A compiled model whose output differs from PyTorch's by more than
``atol + rtol * max|reference|`` is an error, never a warning: a fast wrong
result is a bug.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from canao.compiler.build import CompiledModel
from canao.compiler.importer import example_inputs, torch_reference
from canao.compiler.pipelines import INT8_PIPELINES
from canao.compiler.quantized import (
    INT8_ATOL,
    INT8_RTOL,
    int8_bound,
    int8_scheme,
    quantized_reference,
)
from canao.errors import NumericsMismatchError

# Sequence lengths a symbolic-length build is checked at.
SYMBOLIC_CHECK_LENGTHS = (16, 48)


@dataclass(frozen=True)
class Tolerance:
    atol: float = 1e-4
    rtol: float = 1e-4  # relative to the largest reference magnitude

    def bound(self, reference: np.ndarray) -> float:
        return self.atol + self.rtol * float(np.abs(reference).max())


def check_lengths(compiled: CompiledModel) -> tuple[int, ...]:
    seq = compiled.spec.seq_len
    return SYMBOLIC_CHECK_LENGTHS if seq is None else (seq,)


def compare(
    compiled: CompiledModel,
    output: np.ndarray,
    inputs: dict[str, np.ndarray],
    device: str,
    tolerance: Tolerance | None = None,
) -> dict[str, object]:
    """Compare one output with PyTorch's for the same inputs; raise on a mismatch."""
    int8 = compiled.pipeline in INT8_PIPELINES
    tolerance = tolerance or (Tolerance(INT8_ATOL, INT8_RTOL) if int8 else Tolerance())
    module = compiled.model.module
    # An int8 build is held to the same model quantized the same way; its distance from the
    # fp32 model is the quantization error, reported beside it (compiler.quantized).
    scheme = int8_scheme(compiled.target.name, compiled.pipeline) if int8 else None
    reference = torch_reference(quantized_reference(module, scheme) if int8 else module, inputs)
    fp32 = torch_reference(module, inputs) if int8 else None
    noise = 0.0 if fp32 is None else float(np.abs(reference.astype(np.float64) - fp32).max())
    if output.shape != reference.shape:
        raise NumericsMismatchError(
            f"{compiled.model.name} on {compiled.target.name}/{compiled.pipeline}: output shape "
            f"{output.shape} differs from PyTorch's {reference.shape}"
        )
    diff = float(np.abs(output.astype(np.float64) - reference).max())
    bound = tolerance.bound(reference)
    if int8:
        bound = max(bound, int8_bound(reference, noise))
    if not diff <= bound:  # also catches NaN
        raise NumericsMismatchError(
            f"{compiled.model.name} on {compiled.target.name}/{compiled.pipeline} ({device}): "
            f"max abs diff {diff:.3g} vs PyTorch exceeds tolerance {bound:.3g}"
        )
    result: dict[str, object] = {"max_abs_diff": diff, "tolerance": bound, "device": device}
    if fp32 is not None:
        result["reference"] = "PyTorch, dense layers quantized as the int8 kernels"
        result["fp32_max_abs_diff"] = float(np.abs(output.astype(np.float64) - fp32).max())
        result["reference_vs_fp32"] = noise
    return result


def verify(
    compiled: CompiledModel,
    run: Callable[[dict[str, np.ndarray]], np.ndarray],
    device: str,
    tolerance: Tolerance | None = None,
) -> dict[str, object]:
    """Run ``compiled`` through ``run`` (one inference) at each check length and compare.

    The result (worst diff) is also stored on ``compiled.numerics`` for the manifest.
    """
    worst: dict[str, object] = {}
    for seq in check_lengths(compiled):
        inputs = example_inputs(compiled.model.config.vocab_size, compiled.spec.batch, seq)
        result = compare(compiled, run(inputs), inputs, device, tolerance)
        if not worst or result["max_abs_diff"] > worst["max_abs_diff"]:  # type: ignore[operator]
            worst = result
    compiled.numerics = worst  # type: ignore[assignment]
    return worst


def verify_locally(
    compiled: CompiledModel, tolerance: Tolerance | None = None
) -> dict[str, object]:
    """Verify on this machine's device (x86 CPU, or a local GPU for cuda builds)."""
    from canao.compiler.importer import INPUT_NAMES
    from canao.latency.runner import local_runner

    runner = local_runner(compiled.executable, compiled.target.device_type)
    return verify(compiled, lambda inputs: runner.run(inputs, INPUT_NAMES), "local", tolerance)
