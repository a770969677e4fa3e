"""canao int8 against the int8 runtimes people ship: LiteRT (XNNPACK) and ONNX Runtime.

Per thread count, one child process (TVM fixes its thread pool per process) builds and
checks canao's ``fast`` (fp32) and ``fast-int8`` builds, opens LiteRT dynamic-range int8 and
ONNX Runtime dynamic int8, and times all four interleaved in blocks (``time_interleaved``)
on the same inputs, for each model and sequence length. Where the host's fastest int8
kernel is not full-range (AVX2 without VNNI: 7-bit activations), the
``fast-int8-full-range`` build is timed beside them too. At 1 thread it also times each int8
dense kernel of the build alone, interleaved with the machine's int8 peak (an assembly loop
of the kernel's dot instructions alone, on registers: ``canao.latency.peak``), and reports
the kernel's fraction of it.

    python benchmarks/int8.py [--models minilm,bert-base] [--seqs 64,128] [--threads 1,2]

Prints the tables; writes benchmarks/results/int8.{csv,md} and int8_kernels.{csv,md} on an
AVX-512 VNNI host, int8_<isa>.{csv,md} and int8_<isa>_kernels.{csv,md} on others (AVX2).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd

SYSTEMS = (
    "canao-fast",
    "canao-fast-int8",
    "canao-fast-int8-full-range",
    "litert-int8",
    "onnxruntime-int8",
)


def _kernel_args(m: int, kp: int, n: int, epilogue: str, tiling: object) -> list[object]:
    import tvm

    lanes, group = tiling.lanes, tiling.group  # type: ignore[attr-defined]
    dtype = tiling.spec.activation_dtype  # type: ignore[attr-defined]
    dev, rng = tvm.cpu(), np.random.default_rng(0)
    args = [
        tvm.runtime.tensor(rng.integers(0, 127, (m, kp)).astype(dtype), dev),
        tvm.runtime.tensor(np.full(m, 0.01, np.float32), dev),
        tvm.runtime.tensor(np.full(m, 128, np.float32), dev),
        tvm.runtime.tensor(
            rng.integers(-127, 127, (n // lanes, kp // group, lanes, group), dtype=np.int8), dev
        ),
        tvm.runtime.tensor(np.zeros(n, np.int32), dev),
        tvm.runtime.tensor(np.full(n, 0.01, np.float32), dev),
    ]
    if epilogue != "none":
        args.append(tvm.runtime.tensor(np.zeros(n, np.float32), dev))
    args.append(tvm.runtime.empty((m, n), "float32", dev))
    return args


def _compiled_kernel(m: int, kp: int, n: int, epilogue: str, tiling: object) -> tuple[object, int]:
    """(a call of the int8 kernel, its operations), built as a model's kernels are."""
    import tvm

    from canao.compiler.pipelines import codegen_pipeline
    from canao.compiler.schedules.dense_int8 import dense_int8_primfunc
    from canao.compiler.targets import get_target

    func = dense_int8_primfunc(m, kp, n, epilogue, tiling)  # type: ignore[arg-type]
    lib = tvm.compile(
        tvm.IRModule({"main": func}),
        target=get_target("x86").tvm_target(),
        tir_pipeline=codegen_pipeline("fast-int8"),
    )
    args = _kernel_args(m, kp, n, epilogue, tiling)
    return (lambda: lib["main"](*args)), 2 * m * kp * n


def host_tiling(full_range: bool = False) -> object:
    """The int8 register tile canao picks for this host."""
    from canao.compiler.schedules.dense_int8 import int8_tiling
    from canao.compiler.targets import get_target

    return int8_tiling(get_target("x86").tvm_target(), full_range)


def int8_pipelines() -> tuple[str, ...]:
    """``fast-int8``, and ``fast-int8-full-range`` where it runs another kernel."""
    differ = host_tiling().isa != host_tiling(full_range=True).isa  # type: ignore[attr-defined]
    return ("fast-int8", "fast-int8-full-range") if differ else ("fast-int8",)


def results_name() -> str:
    """``int8`` on AVX-512 VNNI hosts (the README's table), ``int8_<isa>`` elsewhere (the
    full-range kernel's name: ``int8_avx2``), so a run on another CPU family never overwrites
    the other's figures."""
    isa = host_tiling(full_range=True).isa  # type: ignore[attr-defined]
    return "int8" if isa == "avx512-vnni" else f"int8_{isa.replace('-', '_')}"


def kernel_rows(compiled: object, model: str, seq: int) -> list[dict[str, object]]:
    """Each int8 dense kernel of a build, timed alone at its shape interleaved with its ISA's
    peak loop (the CPU's clock moves between moments: a ratio is only read side by side)."""
    from canao.compiler.schedules.dense_int8 import ISAS, Int8Tiling
    from canao.latency.peak import int8_peak
    from canao.latency.protocol import Protocol, time_interleaved

    rows, peaks = [], {}
    for gvar in compiled.lowered.functions:  # type: ignore[attr-defined]
        name = gvar.name_hint
        if not name.startswith("canao_dense_int8_"):
            continue
        rest = name.removeprefix("canao_dense_int8_")
        # Longest name first: "avx2_u7_bias..." also starts with "avx2_".
        names = sorted(ISAS, key=len, reverse=True)
        isa = next(i for i in names if rest.startswith(i.replace("-", "_") + "_"))
        epilogue, shape = rest.removeprefix(isa.replace("-", "_") + "_").rsplit("_", 1)
        m, kp, n = (int(v) for v in shape.split("x"))
        tile = Int8Tiling.for_isa(isa).for_shape(m, kp)  # as the pass chose it
        if isa not in peaks:  # the ceiling of this kernel's own instructions
            peaks[isa] = int8_peak(isa)
        peak, peak_ops = peaks[isa]
        kernel, ops = _compiled_kernel(m, kp, n, epilogue, tile)
        seconds = time_interleaved({"kernel": kernel, "peak": peak}, Protocol(3, 40, 5))
        kernel_s, peak_s = (float(np.median(seconds[k])) for k in ("kernel", "peak"))
        gops, peak_gops = ops / kernel_s / 1e9, peak_ops / peak_s / 1e9
        rows.append(
            {
                "model": model,
                "seq": seq,
                "kernel": name,
                "us": round(kernel_s * 1e6, 1),
                "gops": round(gops, 1),
                "peak_gops": round(peak_gops, 1),
                "fraction_of_peak": round(gops / peak_gops, 3),
            }
        )
    return rows


def child(models: list[str], seqs: list[int], threads: int, repeats: int, out: Path) -> None:
    from canao.compiler.build import compile_model
    from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs, torch_reference
    from canao.compiler.models import load_model
    from canao.compiler.verify import verify_locally
    from canao.latency.baselines import check_numerics, make_runner
    from canao.latency.protocol import Protocol, summarize, time_interleaved
    from canao.latency.runner import local_runner

    rows, kernels = [], []
    for model_name in models:
        model = load_model(model_name)
        for seq in seqs:
            inputs = example_inputs(model.config.vocab_size, 1, seq)
            reference = torch_reference(model.module, inputs)
            calls, diffs = {}, {}
            for pipeline in ("fast", *int8_pipelines()):
                compiled = compile_model(model, "x86", pipeline, InputSpec(1, seq))
                numerics = verify_locally(compiled)
                runner = local_runner(compiled.executable)
                calls[f"canao-{pipeline}"] = runner.bind(inputs, INPUT_NAMES)
                diffs[f"canao-{pipeline}"] = numerics.get(
                    "fp32_max_abs_diff", numerics["max_abs_diff"]
                )
                if pipeline != "fast" and threads == 1:
                    kernels += kernel_rows(compiled, model_name, seq)
            for system in ("litert-int8", "onnxruntime-int8"):
                baseline = make_runner(system, model, batch=1, seq=seq, threads=threads)
                diffs[system], _ = check_numerics(baseline, inputs, reference)
                calls[system] = baseline.bind(inputs)
            seconds = time_interleaved(calls, Protocol(warmup=3, repeats=repeats))
            for system, values in seconds.items():
                stats = summarize(values)
                rows.append(
                    {
                        "model": model_name,
                        "seq": seq,
                        "threads": threads,
                        "system": system,
                        "median_ms": stats.median_ms,
                        "iqr_ms": stats.iqr_ms,
                        "max_abs_diff_vs_fp32": diffs[system],
                    }
                )
            print(f"done {model_name} seq {seq} threads {threads}", flush=True)
    out.write_text(json.dumps({"rows": rows, "kernels": kernels}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--seqs", default="64,128")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    models, seqs = args.models.split(","), [int(s) for s in args.seqs.split(",")]
    if args.child is not None:
        child(models, seqs, int(os.environ["TVM_NUM_THREADS"]), args.repeats, args.child)
        return
    from _results import header, publish

    rows, kernels = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for threads in (int(t) for t in args.threads.split(",")):
            out = Path(tmp) / f"t{threads}.json"
            command = [sys.executable, __file__, "--child", str(out), "--models", args.models]
            command += ["--seqs", args.seqs, "--repeats", str(args.repeats)]
            env = {**os.environ, "TVM_NUM_THREADS": str(threads)}
            subprocess.run(command, env=env, check=True)
            result = json.loads(out.read_text())
            rows += result["rows"]
            kernels += result["kernels"]
    table = pd.DataFrame(rows)
    wide = table.pivot_table(
        index=["model", "seq", "threads"], columns="system", values="median_ms"
    ).reset_index()
    wide["int8_vs_litert_int8"] = wide["litert-int8"] / wide["canao-fast-int8"]
    wide["int8_vs_canao_fp32"] = wide["canao-fast"] / wide["canao-fast-int8"]
    ratios = ["int8_vs_litert_int8", "int8_vs_canao_fp32"]
    if "canao-fast-int8-full-range" in wide:
        full = wide["canao-fast-int8-full-range"]
        wide["full_range_vs_litert_int8"] = wide["litert-int8"] / full
        ratios.append("full_range_vs_litert_int8")
    systems = [system for system in SYSTEMS if system in wide]
    columns = ["model", "seq", "threads", *systems, *ratios]
    detail = f"batch 1; medians of {args.repeats} repeats, interleaved per cell; ms"
    name = results_name()
    used = [host_tiling(p.endswith("full-range")).isa for p in int8_pipelines()]  # type: ignore[attr-defined]
    detail += f"; int8 kernels: {', '.join(used)} ({', '.join(int8_pipelines())})"
    publish(table, wide[columns].round(2), name, f"int8 side by side. {header(detail)}")
    if kernels:
        frame = pd.DataFrame(kernels)
        title = (
            "int8 dense kernels at 1 thread against their ISA's peak (an assembly loop of "
            "the kernel's dot instructions alone, on registers: canao.latency.peak), each "
            "timed interleaved with the peak. "
            f"{header('1 thread')}"
        )
        publish(frame, frame, f"{name}_kernels", title)


if __name__ == "__main__":
    main()
