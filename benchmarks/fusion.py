"""Polynomial layer fusion: TVM's fusion vs canao's, same schedules, side by side.

For MiniLM-L6 and BERT-base shapes (batch 1; seq 128, the issue's setting, and the
longer 384 and 512, where attention's S^2 share of the work grows):
- kernels launched per inference and primfuncs for TVM's `default` build
  (tvm.compile), TVM's `default-fused`, canao's schedules with TVM's fusion
  (`fast-tvm-fusion`) and with canao's fusion (`fast`);
- bytes of intermediate tensors written (fusion report, fast pipelines);
- latency of `fast-tvm-fusion` vs `fast` at 1 and 2 threads, interleaved in
  rounds in one child process per thread count (TVM_NUM_THREADS is per process).

    python benchmarks/fusion.py [--models minilm,bert-base] [--seqs 128,384,512] [--threads 1,2]

Prints the table; writes benchmarks/results/fusion.{csv,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pandas as pd
from _results import header, publish

TIMED = ("fast-tvm-fusion", "fast")
COUNTED = ("default", "default-fused", *TIMED)


def structure_rows(model_name: str, seq: int) -> list[dict]:
    from canao.compiler.build import compile_model
    from canao.compiler.importer import InputSpec, import_bert
    from canao.compiler.models import load_model
    from canao.compiler.targets import get_target
    from canao.fusion.report import fusion_report

    model = load_model(model_name)
    imported = import_bert(model.module, InputSpec(1, seq))
    target = get_target("x86").tvm_target()
    rows = []
    for pipeline in COUNTED:
        kernels = compile_model(model, "x86", pipeline, InputSpec(1, seq)).kernels
        row = {"model": model_name, "seq": seq, "pipeline": pipeline, **kernels.summary()}
        if pipeline in TIMED:
            report = fusion_report(imported, target, canao_fusion=pipeline == "fast")
            row["intermediate_MB"] = float(report.intermediate_bytes.iloc[-2]) / 1e6
            row["graph_operators_before_kernels"] = int(report.operators.iloc[-3])
        rows.append(row)
    return rows


def child(model_name: str, seq: int, threads: int, repeats: int) -> list[dict]:
    from canao.compiler.build import compile_model
    from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs
    from canao.compiler.models import load_model
    from canao.compiler.verify import compare
    from canao.latency.protocol import Protocol, summarize, time_interleaved
    from canao.latency.runner import local_runner

    model = load_model(model_name)
    inputs = example_inputs(model.config.vocab_size, 1, seq)
    calls, diffs = {}, {}
    for pipeline in TIMED:
        compiled = compile_model(model, "x86", pipeline, InputSpec(1, seq))
        runner = local_runner(compiled.executable)
        output = runner.run(inputs, INPUT_NAMES)
        diffs[pipeline] = compare(compiled, output, inputs, "local")["max_abs_diff"]
        calls[pipeline] = runner.bind(inputs, INPUT_NAMES)
    seconds = time_interleaved(calls, Protocol(warmup=2, repeats=repeats), rounds=5)
    rows = []
    for pipeline, timings in seconds.items():
        stats = summarize(timings)
        rows.append(
            {
                "model": model_name,
                "seq": seq,
                "pipeline": pipeline,
                "threads": threads,
                "median_ms": stats.median_ms,
                "iqr_ms": stats.iqr_ms,
                "max_abs_diff": diffs[pipeline],
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seqs", default="128,384,512")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--child", nargs=3, metavar=("MODEL", "SEQ", "THREADS"))
    args = parser.parse_args()
    if args.child:
        model, seq, threads = args.child[0], int(args.child[1]), int(args.child[2])
        print(json.dumps(child(model, seq, threads, args.repeats)))
        return
    structure, timing = [], []
    runs = [(m, int(s)) for m in args.models.split(",") for s in args.seqs.split(",")]
    for model, seq in runs:
        print(f"{model} seq {seq}: kernel counts and fusion report ...", flush=True)
        structure += structure_rows(model, seq)
        for threads in (int(t) for t in args.threads.split(",")):
            print(f"{model} seq {seq}: timing at {threads} thread(s) ...", flush=True)
            env = dict(os.environ, TVM_NUM_THREADS=str(threads))
            done = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    model,
                    str(seq),
                    str(threads),
                    "--repeats",
                    str(args.repeats),
                ],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            timing += json.loads(done.stdout.strip().splitlines()[-1])
    table = pd.DataFrame(structure).merge(
        pd.DataFrame(timing), on=["model", "seq", "pipeline"], how="left"
    )
    base = (
        table[table.pipeline == "fast-tvm-fusion"].set_index(["model", "seq", "threads"]).median_ms
    )
    table["speedup_vs_tvm_fusion"] = [
        base.get((r.model, r.seq, r.threads), float("nan")) / r.median_ms
        for r in table.itertuples()
    ]
    title = header(f"batch 1, seq {args.seqs}; latency: median of interleaved rounds")
    shown = table.round(
        {"median_ms": 2, "iqr_ms": 2, "intermediate_MB": 1, "speedup_vs_tvm_fusion": 2}
    )
    publish(table, shown, "fusion", title)


if __name__ == "__main__":
    main()
