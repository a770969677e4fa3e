"""canao vs the runtimes users deploy BERT with: LiteRT (fp32, int8), ONNX Runtime, torch.

Same inputs, same protocol (warm-up, repeats, median/min/IQR), threads recorded;
every row checked against PyTorch (int8's difference is reported, not bounded).
Baselines are timed interleaved in blocks in this process; canao's `fast`
build in a child process per thread count (TVM fixes its thread count per
process).

    python benchmarks/baselines.py [--models minilm,bert-base] [--threads 1,2] [--seq 128]

Prints the table; writes benchmarks/results/baselines.{csv,md,png}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
from _results import RESULTS, header, publish

from canao import workflow
from canao.latency.baselines import SPEEDUP_COLUMN, write_outputs
from canao.latency.protocol import Protocol


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    frames = []
    for model in args.models.split(","):
        print(f"measuring {model} ...", flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            table = workflow.compare_with_baselines(
                model,
                [int(t) for t in args.threads.split(",")],
                args.seq,
                protocol=Protocol(warmup=3, repeats=args.repeats),
                workdir=Path(tmp),
            )
        frames.append(table.assign(model=model))
    table = pd.concat(frames, ignore_index=True)
    shown = table[
        [
            "model",
            "system",
            "threads",
            "median_ms",
            "min_ms",
            "iqr_ms",
            SPEEDUP_COLUMN,
            "max_abs_diff",
        ]
    ].round({"median_ms": 2, "min_ms": 2, "iqr_ms": 2, SPEEDUP_COLUMN: 2})
    shown = shown.sort_values(["model", "threads", "median_ms"], kind="stable")
    publish(
        table,
        shown,
        "baselines",
        header(f"batch 1, seq {args.seq}; medians of {args.repeats} repeats"),
    )
    write_outputs(table, RESULTS, stem="baselines")  # the same CSV, plus the bar chart


if __name__ == "__main__":
    main()
