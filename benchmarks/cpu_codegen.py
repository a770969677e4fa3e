"""Fast CPU code generation: canao `fast` vs TVM default, torch, ONNX Runtime, LiteRT.

Side by side in one run, per (model, seq, threads): every system is checked
against PyTorch, then timed in interleaved rounds (each round: one warm-up
call, then `--per-round` timed calls; the starting system rotates), so a
burst of load on this shared machine spreads over all systems. Each
(model, seq, threads) runs in its own child process with TVM_NUM_THREADS set,
since TVM fixes its thread count when its pool starts.

TVM's `default` build (what `tvm.compile` does) takes seconds per inference and
has no parallel loops: it is timed after the others (two calls), at 1 thread only.

Also measured: single-core fp32 GEMM throughput (OpenBLAS sgemm via numpy, and
canao's packed kernel, square sizes 256..1024); each system's achieved GFLOP/s on the
whole model as a fraction of that peak; canao's in-model GEMM throughput from
its per-kernel profile.

    python benchmarks/cpu_codegen.py [--models minilm,bert-base] [--seqs 128,64]
        [--threads 1,2] [--rounds 5] [--per-round 4]

Prints the tables; writes benchmarks/results/cpu_codegen.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections.abc import Callable

import numpy as np
import pandas as pd
from _results import header, publish

from canao.latency.protocol import Protocol, time_callable, time_interleaved

BASELINES = ("torch-eager", "onnxruntime", "litert-fp32")
SLOW_SYSTEMS = {"tvm-default"}  # timed with fewer calls: seconds per inference


def bert_flops(layers: int, hidden: int, ffn: int, seq: int, batch: int = 1) -> float:
    """Multiply-adds x 2 of one BERT encoder pass (dense layers + attention products)."""
    dense = 4 * seq * hidden * hidden + 2 * seq * hidden * ffn
    attention = 2 * seq * seq * hidden
    return 2.0 * batch * layers * (dense + attention)


def time_systems(
    calls: dict[str, Callable[[], object]], rounds: int, per_round: int
) -> dict[str, list[float]]:
    """Fast systems interleaved in blocks (the project's protocol); then the slow ones
    (multi-second builds) back to back, two timed calls each after one warm-up."""
    fast = {name: call for name, call in calls.items() if name not in SLOW_SYSTEMS}
    protocol = Protocol(warmup=1, repeats=rounds * per_round)
    seconds = time_interleaved(fast, protocol, rounds=rounds)
    for name in calls.keys() & SLOW_SYSTEMS:
        seconds[name] = time_callable(calls[name], Protocol(warmup=1, repeats=2))
    return seconds


def child(model_name: str, seq: int, threads: int, rounds: int, per_round: int) -> list[dict]:
    """Runs inside the child process (TVM_NUM_THREADS already set)."""
    import torch
    import tvm

    from canao.compiler.build import compile_model
    from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs, torch_reference
    from canao.compiler.models import load_model
    from canao.compiler.verify import compare
    from canao.latency import baselines
    from canao.latency.protocol import summarize
    from canao.latency.runner import local_runner

    torch.set_num_threads(threads)
    model = load_model(model_name)
    inputs = example_inputs(model.config.vocab_size, 1, seq)
    reference = torch_reference(model.module, inputs)
    calls: dict[str, Callable[[], object]] = {}
    diffs: dict[str, float] = {}
    builds: dict[str, float] = {}
    pipelines = {"canao-fast": "fast"} | ({"tvm-default": "default"} if threads == 1 else {})
    for system, pipeline in pipelines.items():
        compiled = compile_model(model, "x86", pipeline, InputSpec(1, seq))
        runner = local_runner(compiled.executable)
        diffs[system] = compare(compiled, runner.run(inputs, INPUT_NAMES), inputs, "local")[
            "max_abs_diff"
        ]
        builds[system] = compiled.build_seconds
        calls[system] = runner.bind(inputs, INPUT_NAMES)
    for system in BASELINES:
        try:
            runner = baselines.make_runner(system, model, batch=1, seq=seq, threads=threads)
        except baselines.BaselineUnavailable as err:
            print(f"skipping {system}: {err}", file=sys.stderr)
            continue
        diffs[system], _ = baselines.check_numerics(runner, inputs, reference)
        calls[system] = runner.bind(inputs)
    seconds = time_systems(calls, rounds, per_round)
    cfg = model.config
    flops = bert_flops(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, seq)
    rows = []
    for system, timings in seconds.items():
        stats = summarize(timings)
        rows.append(
            {
                "model": model_name,
                "seq": seq,
                "threads": threads,
                "system": system,
                "median_ms": stats.median_ms,
                "min_ms": stats.min_ms,
                "iqr_ms": stats.iqr_ms,
                "calls": len(timings),
                "gflops": flops / (stats.median_ms * 1e-3) / 1e9,
                "max_abs_diff": diffs[system],
                "build_s": builds.get(system, float("nan")),
            }
        )
    if threads == 1:
        rows.append(_canao_gemm_row(model, seq, flops, tvm))
    return rows


def _canao_gemm_row(model, seq: int, flops: float, tvm) -> dict:
    """canao's dense kernels alone, in the model: FLOPs / time from the kernel profile."""
    from canao.compiler.build import compile_model
    from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs
    from canao.latency.profile import profile_kernels
    from canao.latency.runner import local_runner

    compiled = compile_model(model, "x86", "fast", InputSpec(1, seq))
    gemm_flops = {
        gvar.name_hint: int(func.attrs["canao.flops"])
        for gvar, func in compiled.lowered.functions.items()
        if isinstance(func, tvm.tirx.PrimFunc) and func.attrs and "canao.flops" in func.attrs
    }
    profile = profile_kernels(
        local_runner(compiled.executable),
        example_inputs(model.config.vocab_size, 1, seq),
        INPUT_NAMES,
        runs=20,
    )
    dense = profile[profile.kernel.isin(gemm_flops)]
    total_flops = sum(gemm_flops[row.kernel] * row.calls for row in dense.itertuples())
    return {
        "model": model.name,
        "seq": seq,
        "threads": 1,
        "system": "canao-fast (dense kernels only)",
        "median_ms": dense.ms.sum(),
        "min_ms": float("nan"),
        "iqr_ms": float("nan"),
        "calls": 20,
        "gflops": total_flops / (dense.ms.sum() * 1e-3) / 1e9,
        "max_abs_diff": float("nan"),
        "build_s": float("nan"),
        "share_of_inference": float(dense.share.sum()),
    }


def gemm_peak() -> dict[str, float]:
    """Single-core fp32 GEMM GFLOP/s, best over square sizes 256..1024: OpenBLAS (numpy
    sgemm) and canao's packed kernel. The larger of the two is the peak we compare to."""
    import tvm

    from canao.compiler.schedules.dense import choose_tiling, dense_primfunc, pack_weight
    from canao.compiler.targets import get_target

    target = get_target("x86").tvm_target()
    tiling = choose_tiling(target)
    rng = np.random.default_rng(0)
    found = {"openblas_sgemm_gflops": 0.0, "canao_packed_gemm_gflops": 0.0}
    for n in (256, 512, 1024):
        a = rng.standard_normal((n, n), dtype=np.float32)
        b = rng.standard_normal((n, n), dtype=np.float32)
        lib = tvm.compile(
            tvm.IRModule({"main": dense_primfunc(n, n, n, "none", tiling)}), target=target
        ).jit()
        args = [tvm.runtime.tensor(x) for x in (a, pack_weight(b, tiling.nb), np.zeros_like(a))]
        canao = _gflops(lambda lib=lib, args=args: lib["main"](*args), n)
        assert np.allclose(args[2].numpy(), a @ b, atol=1e-2)
        openblas = _gflops(lambda a=a, b=b: a @ b, n)
        found["openblas_sgemm_gflops"] = max(found["openblas_sgemm_gflops"], openblas)
        found["canao_packed_gemm_gflops"] = max(found["canao_packed_gemm_gflops"], canao)
    return found


def _gflops(fn: Callable[[], object], n: int) -> float:
    seconds = time_callable(fn, Protocol(warmup=1, repeats=20))
    return 2.0 * n**3 / float(np.median(seconds)) / 1e9


def _spawn(argv: list[str], threads: int) -> str:
    env = dict(
        os.environ,
        TVM_NUM_THREADS=str(threads),
        OMP_NUM_THREADS=str(threads),
        OPENBLAS_NUM_THREADS=str(threads),
    )
    done = subprocess.run(
        [sys.executable, __file__, *argv], env=env, capture_output=True, text=True, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"child {argv} failed:\n{done.stderr[-3000:]}")
    return done.stdout.strip().splitlines()[-1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--seqs", default="128,64")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--per-round", type=int, default=4)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SEQ", "THREADS"))
    parser.add_argument("--peak", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        print(json.dumps(gemm_peak()))
        return
    if args.child:
        model, seq, threads = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(child(model, seq, threads, args.rounds, args.per_round)))
        return
    run(args)


def run(args: argparse.Namespace) -> None:
    peak = json.loads(_spawn(["--peak"], 1))
    rows: list[dict] = []
    for model in args.models.split(","):
        for seq in (int(s) for s in args.seqs.split(",")):
            for threads in (int(t) for t in args.threads.split(",")):
                print(f"measuring {model} seq {seq} threads {threads} ...", flush=True)
                rows += json.loads(
                    _spawn(
                        [
                            "--child",
                            model,
                            str(seq),
                            str(threads),
                            "--rounds",
                            str(args.rounds),
                            "--per-round",
                            str(args.per_round),
                        ],
                        threads,
                    )
                )
    table = pd.DataFrame(rows)
    peak_gflops = max(peak.values())
    table["fraction_of_peak"] = table.gflops / (peak_gflops * table.threads)
    litert = table[table.system == "litert-fp32"].set_index(["model", "seq", "threads"]).median_ms
    table["speedup_vs_litert_fp32"] = [
        litert.get((r.model, r.seq, r.threads), np.nan) / r.median_ms for r in table.itertuples()
    ]
    title = header(
        f"single-core GEMM peak: OpenBLAS {peak['openblas_sgemm_gflops']:.0f} GFLOP/s, "
        f"canao packed {peak['canao_packed_gemm_gflops']:.0f} GFLOP/s (peak = the larger); "
        "latency = median of interleaved rounds"
    )
    shown = table.round(
        {
            "median_ms": 2,
            "min_ms": 2,
            "iqr_ms": 2,
            "gflops": 1,
            "fraction_of_peak": 2,
            "speedup_vs_litert_fp32": 2,
            "build_s": 1,
        }
    )
    publish(table, shown, "cpu_codegen", title)


if __name__ == "__main__":
    main()
