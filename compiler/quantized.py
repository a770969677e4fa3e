"""The PyTorch model an int8 build is checked against: the same model, its dense layers
computed exactly as :mod:`canao.compiler.schedules.dense_int8` computes them.

An int8 build cannot match the fp32 model to 1e-4 (quantization moves the logits by about
1e-3 of their range), and a loose bound against fp32 would hide a wrong kernel. So each
``nn.Linear`` that the int8 pass rewrites is swapped, in a copy, for :class:`DynamicInt8Linear`
(per-row uint8 activations, per-channel int8 weights, exact integer sums), and the build must
match that copy tightly; its distance from fp32 is reported beside it, as the quantization
error.
"""

from __future__ import annotations

import copy

import torch

from canao.compiler.schedules.dense_int8 import (
    Int8Tiling,
    int8_packs,
    int8_tiling,
    quantize_weight,
    reference_dense,
)

# How far an int8 build may be from the same-scheme PyTorch model. Dynamic quantization is
# discontinuous: a value within float rounding (~1e-6) of a rounding midpoint can go the
# other way in the compiled layer norm's output, moving that element by one step (1/255 of
# its row's range), and each later layer amplifies such differences until they are as large
# as quantization noise itself. So one layer matches the reference to ~1e-5 (the kernel
# tests), but a 6-layer model only to the order of its own quantization error. The bound is
# therefore relative to that error, measured on the same inputs: a build no further from the
# reference than NOISE_FACTOR times the reference's distance from fp32. A wrong kernel (a
# zero point, scale or packing off) lands orders of magnitude beyond it.
#
# The noise measured on a handful of values is one sample of it, and can cancel: a
# quick-start winner's two logits (about +-1) were 0.009 from fp32 as the reference computes
# them, and the build 0.034 from the reference. So an output of at most POOLED_VALUES values
# (a classifier's logits) gets a floor on the noise term: NOISE_FLOOR times the output's
# RMS (6% with the factor 3). Hidden states (thousands of values) keep the measured noise,
# which catches a 10% wrong weight scale (tests/test_int8.py).
INT8_ATOL = 1e-4
INT8_RTOL = 1e-3
NOISE_FACTOR = 3.0
NOISE_FLOOR = 0.02
POOLED_VALUES = 64


def int8_bound(reference: object, noise: float) -> float:
    """How far an int8 build's output may be from ``reference`` (the same-scheme PyTorch
    output), given the reference's distance ``noise`` from fp32."""
    import numpy as np

    values = np.asarray(reference, dtype=np.float64)
    if 0 < values.size <= POOLED_VALUES:
        noise = max(noise, NOISE_FLOOR * float(np.sqrt(np.mean(values**2))))
    return INT8_ATOL + NOISE_FACTOR * noise


class DynamicInt8Linear(torch.nn.Module):
    """``nn.Linear`` as the int8 kernel computes it (GELU stays in the next module)."""

    def __init__(self, linear: torch.nn.Linear, levels: int = 255) -> None:
        super().__init__()
        weight = linear.weight.detach().t().contiguous().numpy()  # [K, N]
        self.qw, self.sw = quantize_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().numpy().copy()
        self.out_features = linear.out_features
        self.levels = levels  # activations' top level: 255, or 127 (AVX2's 7-bit kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        y = reference_dense(rows, self.qw, self.sw, self.bias, "bias", self.levels)
        return y.reshape(*x.shape[:-1], self.out_features)  # type: ignore[union-attr]


def quantized_reference(
    module: torch.nn.Module, tiling: Int8Tiling | None = None
) -> torch.nn.Module:
    """A copy of ``module`` with each dense layer the int8 pass rewrites made int8, as
    ``tiling``'s kernels compute it (default: AVX-512 VNNI's; :func:`int8_scheme` gives a
    build's)."""
    tiling = tiling or Int8Tiling()
    copied = copy.deepcopy(module).eval()
    for parent in list(copied.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, torch.nn.Linear) and int8_packs(child.out_features, tiling):
                setattr(parent, name, DynamicInt8Linear(child, tiling.spec.levels))
    return copied


def int8_scheme(target: str, pipeline: str) -> Int8Tiling:
    """The int8 kernels pipeline ``pipeline`` builds for canao target ``target`` (its CPU's
    features decide): what a PyTorch model must be quantized as to score like the build."""
    from canao.compiler.pipelines import int8_full_range
    from canao.compiler.targets import get_target

    return int8_tiling(get_target(target).tvm_target(), full_range=int8_full_range(pipeline))
