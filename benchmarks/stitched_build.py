"""Candidates stitched from cached segments against whole builds: build seconds and latency.

A search's latency evaluator builds each candidate from segments (embeddings, each layer,
the head) lowered once (``canao.compiler.segments``). This script draws ``--archs``
architectures from the MiniLM-L6 search space (seeded), builds each twice, stitched and
whole (``torch.export`` + the full pipeline, kernels linked from the same kernel cache),
checks both against PyTorch, and times the two interleaved in this process. Stitching
must not change what is measured: the ratio column should sit at 1.0 within the noise.

    TVM_NUM_THREADS=1 python benchmarks/stitched_build.py [--archs 40] [--seq 128]

Prints the table and a summary; writes benchmarks/results/stitched_build.{csv,md}.
"""

from __future__ import annotations

import argparse
import random
import time

import numpy as np
import pandas as pd

from canao.compiler.build import compile_model, compile_stitched
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs
from canao.compiler.kernel_cache import process_kernel_cache
from canao.compiler.models import preset_config
from canao.compiler.pipelines import codegen_pipeline
from canao.compiler.segments import SegmentCache
from canao.compiler.targets import get_target
from canao.compiler.verify import verify_locally
from canao.latency.measure import threads_here
from canao.latency.protocol import Protocol, time_interleaved
from canao.latency.runner import local_runner
from canao.nas.space import SearchSpace
from canao.nas.workloads import SeededWorkloads

try:
    from _results import header, publish
except ImportError:  # run from the repository root
    from benchmarks._results import header, publish


def run(archs: int, seq: int, seed: int) -> pd.DataFrame:
    base = preset_config("minilm-l6-shape")
    space = SearchSpace.from_teacher(base)
    rng = random.Random(seed)
    target = get_target("x86")
    spec = InputSpec(1, seq)
    kernels = process_kernel_cache(target.tvm_target(), codegen_pipeline("fast"))
    segments = SegmentCache(str(target.tvm_target()), "fast", spec.shapes())
    workloads = SeededWorkloads(base)
    inputs = example_inputs(base.vocab_size, 1, seq)
    rows = []
    for index in range(archs):
        arch = space.sample(rng)
        loaded, keys = workloads.model(arch)
        started = time.perf_counter()
        stitched = compile_stitched(loaded, keys, segments, target, "fast", spec, kernels)
        stitched_s = time.perf_counter() - started
        whole = compile_model(loaded, target, "fast", spec, kernel_cache=kernels)
        verify_locally(stitched)
        verify_locally(whole)
        calls = {
            name: local_runner(build.executable).bind(inputs, INPUT_NAMES)
            for name, build in (("stitched", stitched), ("whole", whole))
        }
        seconds = time_interleaved(calls, Protocol(warmup=3, repeats=20))
        medians = {name: float(np.median(times)) * 1e3 for name, times in seconds.items()}
        rows.append(
            {
                "index": index,
                "arch": arch.shape_key,
                "segments_lowered": stitched.segments_lowered,
                "stitched_build_s": round(stitched_s, 3),
                "whole_build_s": round(whole.build_seconds, 3),
                "stitched_ms": round(medians["stitched"], 3),
                "whole_ms": round(medians["whole"], 3),
                "ratio": round(medians["stitched"] / medians["whole"], 3),
                "launches_equal": stitched.kernels.kernel_launches == whole.kernels.kernel_launches,
                "max_abs_diff": max(
                    build.numerics["max_abs_diff"]  # type: ignore[index]
                    for build in (stitched, whole)
                ),
            }
        )
        print(rows[-1], flush=True)
    return pd.DataFrame(rows)


def summary(table: pd.DataFrame) -> dict[str, object]:
    later = table[table["index"] >= 20]
    return {
        "archs": len(table),
        "median stitched build s": round(float(table["stitched_build_s"].median()), 3),
        "median stitched build s after the first 20": (
            round(float(later["stitched_build_s"].median()), 3) if len(later) else None
        ),
        "median whole build s": round(float(table["whole_build_s"].median()), 3),
        "latency ratio stitched/whole: median": round(float(table["ratio"].median()), 3),
        "latency ratio: min, max": (float(table["ratio"].min()), float(table["ratio"].max())),
        "kernel launches equal": int(table["launches_equal"].sum()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--archs", type=int, default=40)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    table = run(args.archs, args.seq, args.seed)
    facts = summary(table)
    title = (
        "Stitched vs whole builds, MiniLM-L6 search space, seq "
        f"{args.seq}, batch 1, {threads_here()} thread(s), interleaved medians of 20 (ms). "
        + header("x86 fast pipeline")
        + "\n\n"
        + "; ".join(f"{key}: {value}" for key, value in facts.items())
    )
    publish(table, table.drop(columns=["index"]), "stitched_build", title)


if __name__ == "__main__":
    main()
