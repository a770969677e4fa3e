"""Measure a compiled library under the protocol, locally or over RPC, with caching.

Local measurements run in a child process (:mod:`canao.latency.worker`)
with TVM_NUM_THREADS fixed, since TVM's thread count is set once per
process. Remote ones use the device's RPC server as it was started.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from canao.errors import CanaoError
from canao.latency.cache import LatencyCache
from canao.latency.environment import default_threads
from canao.latency.protocol import Measurement, Protocol, make_measurement, measurement_key
from canao.latency.rpc import RPCAddress, remote_runner
from canao.latency.runner import local_runner, set_thread_env


class MeasurementError(CanaoError):
    """The library could not be run or timed on the device."""


@dataclass(frozen=True)
class Workload:
    """What is measured: one exported library and what it was built from."""

    # The exported .so; or, timed in this process only, the in-memory VM executable.
    library: Path | Any
    model: str
    model_hash: str
    target: str
    pipeline: str
    shapes: str
    input_names: tuple[str, ...]
    device_type: str = "cpu"


@dataclass(frozen=True)
class TimedRun:
    measurement: Measurement
    output: np.ndarray | None  # one inference's output; None when served from the cache
    cached: bool = False


def measure(
    workload: Workload,
    inputs: dict[str, np.ndarray],
    *,
    protocol: Protocol | None = None,
    threads: int | None = None,
    rpc: RPCAddress | None = None,
    cache: LatencyCache | None = None,
    refresh: bool = False,
    rpc_timeout_s: float = 20.0,
    in_process: bool = False,
) -> TimedRun:
    """Latency of ``workload`` on ``inputs``: from ``cache`` if known, else measured and stored.

    ``in_process`` times a local build in this process instead of a child, saving
    the child's start-up (seconds per candidate in a search). It is only honest
    when this process's TVM runtime already uses the wanted thread count, which
    is checked (otherwise the child is used). The price: a crash in generated
    code ends this process.
    """
    protocol = protocol or Protocol()
    device = rpc.label if rpc else "local"
    wanted_threads = threads if threads is not None else default_threads()
    key = measurement_key(
        workload.model_hash,
        workload.target,
        workload.pipeline,
        workload.shapes,
        wanted_threads,
        device,
    )
    if cache is not None and not refresh:
        hit = cache.get(key)
        if hit is not None:
            return TimedRun(hit, None, cached=True)
    if rpc is None and in_process and threads_here() == wanted_threads:
        seconds, output = _measure_here(workload, inputs, protocol)
        used_threads = wanted_threads
    elif rpc is None:
        seconds, output, used_threads = _measure_in_child(workload, inputs, protocol, threads)
    else:
        with remote_runner(workload.library, rpc, workload.device_type, rpc_timeout_s) as runner:
            output = runner.run(inputs, workload.input_names)
            seconds = runner.time(inputs, workload.input_names, protocol)
            used_threads = runner.threads()
    measurement = make_measurement(
        seconds,
        key=key,
        model=workload.model,
        model_hash=workload.model_hash,
        target=workload.target,
        pipeline=workload.pipeline,
        shapes=workload.shapes,
        threads=used_threads if rpc else wanted_threads,
        protocol=protocol,
        device=device,
        device_cpu=None if rpc is None else f"remote ({rpc.label})",
    )
    if cache is not None:
        cache.put(measurement)
    return TimedRun(measurement, output)


def threads_here() -> int:
    """Threads this process's TVM runtime uses (it reads TVM_NUM_THREADS once, at start)."""
    import tvm

    return int(tvm.get_global_func("runtime.NumThreads")())


def _measure_here(
    workload: Workload, inputs: dict[str, np.ndarray], protocol: Protocol
) -> tuple[list[float], np.ndarray]:
    runner = local_runner(workload.library, workload.device_type)
    output = runner.run(inputs, workload.input_names)
    return runner.time(inputs, workload.input_names, protocol), output


def _measure_in_child(
    workload: Workload, inputs: dict[str, np.ndarray], protocol: Protocol, threads: int | None
) -> tuple[list[float], np.ndarray, int]:
    with tempfile.TemporaryDirectory(prefix="canao-measure-") as tmp:
        folder = Path(tmp)
        np.savez(folder / "inputs.npz", **inputs)
        request = {
            "library": str(workload.library),
            "device_type": workload.device_type,
            "inputs": str(folder / "inputs.npz"),
            "input_names": list(workload.input_names),
            "output": str(folder / "output.npy"),
            "result": str(folder / "result.json"),
            "protocol": {
                "warmup": protocol.warmup,
                "repeats": protocol.repeats,
                "number": protocol.number,
            },
        }
        (folder / "request.json").write_text(json.dumps(request), encoding="utf-8")
        done = subprocess.run(
            [sys.executable, "-m", "canao.latency.worker", str(folder / "request.json")],
            env=set_thread_env(threads if threads is not None else default_threads()),
            capture_output=True,
            text=True,
            check=False,
        )
        if done.returncode != 0 or not (folder / "result.json").exists():
            tail = "\n".join(done.stderr.strip().splitlines()[-5:])
            raise MeasurementError(
                f"running {workload.library.name} locally failed (exit {done.returncode}): {tail}"
            )
        result = json.loads((folder / "result.json").read_text(encoding="utf-8"))
        return result["seconds"], np.load(folder / "output.npy"), int(result["threads"])
