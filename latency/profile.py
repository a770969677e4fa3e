"""Per-kernel time of one compiled model: where an inference's time goes.

The Relax VM calls an instrument hook before and after every kernel and
builtin; summing wall time per callee over several inferences gives the
profile the fusion report, the latency predictor and the benchmarks read.
Hook overhead (a Python call per kernel) makes the total a little larger
than the protocol's latency: use the profile for shares, the protocol for
latency.
"""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from typing import Any

import numpy as np
import pandas as pd


def profile_kernels(
    runner: Any,
    inputs: dict[str, np.ndarray],
    names: tuple[str, ...],
    runs: int = 10,
    warmup: int = 3,
) -> pd.DataFrame:
    """One row per callee: ``kernel``, ``calls`` per inference, ``ms`` per inference, ``share``.

    ``runner`` is a :class:`canao.latency.runner.DeviceRunner` on a local device.
    """
    infer = runner.bind(inputs, names)  # the same tensors every run
    for _ in range(warmup):
        infer()
    seconds: dict[str, float] = defaultdict(float)
    calls: Counter[str] = Counter()
    started: dict[str, float] = {}

    def hook(_func: Any, name: str, before_run: bool, _ret: Any, *_args: Any) -> None:
        if before_run:
            started[name] = time.perf_counter()
        else:
            seconds[name] += time.perf_counter() - started[name]
            calls[name] += 1

    runner.vm.set_instrument(hook)
    try:
        for _ in range(runs):
            infer()
    finally:
        runner.vm.set_instrument(None)
    rows = [
        {"kernel": name, "calls": calls[name] // runs, "ms": total / runs * 1e3}
        for name, total in seconds.items()
    ]
    frame = pd.DataFrame(rows).sort_values("ms", ascending=False, ignore_index=True)
    frame["share"] = frame["ms"] / frame["ms"].sum()
    return frame
