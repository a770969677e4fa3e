"""End-to-end flows shared by the CLI, the benchmarks and (later) the search.

compile -> verify against PyTorch (locally, or on the RPC device) -> export;
and bench: the same, then the latency protocol per thread count, with cache.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from canao.compiler.build import CompiledModel, compile_model, export_artifact, export_library
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs
from canao.compiler.models import load_model
from canao.compiler.pipelines import DEFAULT_PIPELINE
from canao.compiler.verify import Tolerance, compare, verify, verify_locally
from canao.latency.cache import LatencyCache
from canao.latency.measure import Workload, measure
from canao.latency.protocol import Protocol
from canao.latency.rpc import RPCAddress, remote_runner

# The sequence length a symbolic-length build is timed at.
DYNAMIC_BENCH_SEQ = 128


def preflight(
    target: str, pipelines: list[str], rpc: RPCAddress | None, rpc_timeout_s: float
) -> None:
    """Check names and the device before minutes of compiling, so a typo costs nothing."""
    from canao.compiler.pipelines import get_pipeline
    from canao.compiler.targets import get_target
    from canao.latency.rpc import connect

    spec = get_target(target)
    spec.check_toolchain()  # a missing cross linker fails here, not after the build
    tvm_target = spec.tvm_target()
    for name in pipelines:
        get_pipeline(name, tvm_target)
    if rpc is not None:
        connect(rpc, rpc_timeout_s)  # raises DeviceUnreachableError, bounded


def can_run_locally(compiled: CompiledModel) -> bool:
    """True where this machine can execute the build (x86 here; cuda with a GPU)."""
    import tvm

    if compiled.target.is_cross:
        return False
    return bool(tvm.device(compiled.target.device_type, 0).exist)


def compile_and_verify(
    model: str,
    target: str = "x86",
    pipeline: str = DEFAULT_PIPELINE,
    batch: int = 1,
    seq: int | None = 128,
    head: str = "base",
    rpc: RPCAddress | None = None,
    rpc_timeout_s: float = 20.0,
    tolerance: Tolerance | None = None,
) -> CompiledModel:
    """Compile and check numerics where the build can run: here, or on the RPC device."""
    preflight(target, [pipeline], rpc, rpc_timeout_s)
    loaded = load_model(model, head=head)  # type: ignore[arg-type]
    compiled = compile_model(loaded, target, pipeline, InputSpec(batch, seq))
    if rpc is not None:
        with tempfile.TemporaryDirectory(prefix="canao-verify-") as tmp:
            library = export_library(compiled, Path(tmp) / "model.so")
            with remote_runner(library, rpc, compiled.target.device_type, rpc_timeout_s) as runner:
                verify(compiled, lambda x: runner.run(x, INPUT_NAMES), rpc.label, tolerance)
    elif can_run_locally(compiled):
        verify_locally(compiled, tolerance)
    else:
        compiled.numerics = {
            "checked": False,
            "reason": f"not run: no {target} device here; pass --rpc HOST:PORT to check on one",
        }
    return compiled


def checked_inference(
    model: str | Path | object, seq: int = 128, batch: int = 1, pipeline: str = DEFAULT_PIPELINE
) -> tuple[Callable[[], object], float]:
    """``model`` built for this machine and checked against PyTorch, bound to example inputs.

    Returns one inference as a no-argument call (for ``time_interleaved`` beside
    other systems in the same process) and the max abs diff against PyTorch.
    """
    from canao.latency.runner import local_runner

    loaded = load_model(model, head="classification")  # type: ignore[arg-type]
    compiled = compile_model(loaded, "x86", pipeline, InputSpec(batch, seq))
    diff = float(verify_locally(compiled)["max_abs_diff"])  # type: ignore[arg-type]
    inputs = example_inputs(loaded.config.vocab_size, batch, seq)
    return local_runner(compiled.executable).bind(inputs, INPUT_NAMES), diff


def export(compiled: CompiledModel, out_dir: Path) -> Path:
    return export_artifact(compiled, out_dir)


def bench(
    model: str,
    target: str,
    pipelines: list[str],
    batch: int,
    seq: int | None,
    head: str = "base",
    *,
    threads: list[int | None],
    protocol: Protocol,
    rpc: RPCAddress | None,
    cache: LatencyCache | None,
    refresh: bool = False,
    workdir: Path,
    rpc_timeout_s: float = 20.0,
    tolerance: Tolerance | None = None,
) -> pd.DataFrame:
    """One row per (pipeline, threads): latency stats, kernel counts, numerics."""
    preflight(target, pipelines, rpc, rpc_timeout_s)
    loaded = load_model(model, head=head)  # type: ignore[arg-type]
    bench_seq = seq or DYNAMIC_BENCH_SEQ
    inputs = example_inputs(loaded.config.vocab_size, batch, bench_seq)
    rows = []
    for pipeline in pipelines:
        compiled = compile_model(loaded, target, pipeline, InputSpec(batch, seq))
        if rpc is None and not can_run_locally(compiled):
            raise_no_device(target)
        library = export_library(compiled, workdir / f"{pipeline}.so")
        workload = Workload(
            library=library,
            model=loaded.name,
            model_hash=loaded.fingerprint,
            target=target,
            pipeline=pipeline,
            shapes=InputSpec(batch, seq).shapes(),
            input_names=INPUT_NAMES,
            device_type=compiled.target.device_type,
        )
        for count in threads:
            run = measure(
                workload,
                inputs,
                protocol=protocol,
                threads=count,
                rpc=rpc,
                cache=cache,
                refresh=refresh,
                rpc_timeout_s=rpc_timeout_s,
            )
            diff = np.nan
            if run.output is not None:  # freshly measured: the same run is checked
                diff = compare(compiled, run.output, inputs, run.measurement.device, tolerance)[
                    "max_abs_diff"
                ]
            rows.append(_row(compiled, run.measurement, diff, run.cached))
    return pd.DataFrame(rows)


def raise_no_device(target: str) -> None:
    from canao.errors import DeviceUnreachableError

    raise DeviceUnreachableError(
        f"cannot run {target} builds on this machine: pass --rpc HOST:PORT (and --key) "
        "to measure on a device"
    )


def _row(compiled: CompiledModel, m, diff: float, cached: bool) -> dict[str, object]:
    return {
        "model": m.model,
        "target": m.target,
        "pipeline": m.pipeline,
        "shapes": f"{compiled.spec.batch}x{compiled.spec.seq_len or 'S'}",
        "threads": m.threads,
        "median_ms": m.median_ms,
        "min_ms": m.min_ms,
        "iqr_ms": m.iqr_ms,
        "kernel_launches": compiled.kernels.kernel_launches,
        "primfuncs": compiled.kernels.primfuncs,
        "vm_builtins": compiled.kernels.vm_builtins,
        "build_s": compiled.build_seconds,
        "max_abs_diff": diff,
        "device": m.device,
        "cached": cached,
    }


def format_table(table: pd.DataFrame) -> str:
    """The table as aligned text, numbers rounded for reading."""
    shown = table.copy()
    for column in ("median_ms", "min_ms", "iqr_ms"):
        shown[column] = shown[column].map(lambda v: f"{v:.2f}")
    shown["build_s"] = shown["build_s"].map(lambda v: f"{v:.1f}")
    shown["max_abs_diff"] = shown["max_abs_diff"].map(
        lambda v: "cached" if v != v else f"{v:.1e}"  # NaN: served from cache, not re-run
    )
    return shown.drop(columns=["cached"]).to_string(index=False)


def compare_with_baselines(
    model: str,
    threads: list[int],
    seq: int = 128,
    batch: int = 1,
    *,
    pipelines: list[str] | None = None,
    systems: list[str] | None = None,
    protocol: Protocol | None = None,
    workdir: Path,
) -> pd.DataFrame:
    """canao's x86 builds next to the baseline runtimes, one row per (system, threads).

    Per thread count the baselines are timed first (interleaved among themselves,
    in this process), then each canao build in its own child process. Every row
    carries its max abs diff against PyTorch; ``speedup_vs_litert_fp32`` compares
    rows of the same thread count.
    """
    from canao.latency import baselines

    protocol = protocol or Protocol()
    loaded = load_model(model)
    spec = InputSpec(batch, seq)
    inputs = example_inputs(loaded.config.vocab_size, batch, seq)
    builds = []
    for pipeline in pipelines or [DEFAULT_PIPELINE]:
        compiled = compile_model(loaded, "x86", pipeline, spec)
        library = export_library(compiled, workdir / f"{pipeline}.so")
        workload = Workload(
            library, loaded.name, loaded.fingerprint, "x86", pipeline, spec.shapes(), INPUT_NAMES
        )
        builds.append((compiled, workload))
    frames = []
    for count in threads:
        frames.append(
            baselines.compare(loaded, [count], seq, batch, protocol=protocol, systems=systems)
        )
        rows = []
        for compiled, workload in builds:
            run = measure(workload, inputs, protocol=protocol, threads=count)
            checked = compare(compiled, run.output, inputs, "local")  # type: ignore[arg-type]
            rows.append(
                baselines.row_from_measurement(
                    run.measurement,
                    f"canao-{compiled.pipeline}",
                    max_abs_diff=float(checked["max_abs_diff"]),  # type: ignore[arg-type]
                    tolerance=float(checked["tolerance"]),  # type: ignore[arg-type]
                )
            )
        frames.append(pd.DataFrame(rows))
    return baselines.add_speedups(pd.concat(frames, ignore_index=True))


def format_comparison(table: pd.DataFrame) -> str:
    from canao.latency.baselines import SPEEDUP_COLUMN

    shown = table[
        ["system", "threads", "median_ms", "min_ms", "iqr_ms", SPEEDUP_COLUMN, "max_abs_diff"]
    ].copy()
    for column in ("median_ms", "min_ms", "iqr_ms"):
        shown[column] = shown[column].map(lambda v: f"{v:.2f}")
    shown[SPEEDUP_COLUMN] = shown[SPEEDUP_COLUMN].map(lambda v: f"{v:.2f}x")
    shown["max_abs_diff"] = shown["max_abs_diff"].map(lambda v: f"{v:.1e}")
    return shown.sort_values(["threads", "system"], kind="stable").to_string(index=False)


def fusion_report(
    model: str, target: str, pipeline: str, batch: int = 1, seq: int | None = 128
) -> str:
    """The per-pass graph table of :mod:`canao.fusion.report` for a CPU fast pipeline."""
    from canao.compiler.importer import import_bert
    from canao.compiler.targets import get_target
    from canao.errors import UnknownPipelineError
    from canao.fusion.report import fusion_report as report

    spec = get_target(target)
    if pipeline not in ("fast", "fast-tvm-fusion") or spec.device_type != "cpu":
        raise UnknownPipelineError(
            f"the fusion report covers the CPU pipelines fast and fast-tvm-fusion, not "
            f"{pipeline!r} on {target}"
        )
    imported = import_bert(load_model(model).module, InputSpec(batch, seq))
    table = report(imported, spec.tvm_target(), canao_fusion=pipeline == "fast")
    table["intermediate_MB"] = (table.pop("intermediate_bytes") / 1e6).round(2)
    return table.to_string(index=False)
