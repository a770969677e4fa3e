"""Kernel counts and latency of TVM's out-of-the-box builds, with PyTorch eager beside them.

For MiniLM-L6 (pretrained) and BERT-base shapes (random weights), batch 1,
seq 128: TVM's ``default`` build (what ``tvm.compile`` does: no fusion, no
schedules) and ``default-fused`` (TVM's per-target pipeline with FuseOps),
each verified against PyTorch, timed under canao's protocol in a child
process per thread count; torch eager timed in this process with the same
protocol and inputs. This is the baseline later pipelines must beat.

    python benchmarks/default_build.py [--models minilm,bert-base] [--threads 1,2]

Prints the table and writes benchmarks/results/default_build.{csv,md}.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import pandas as pd
import torch
from _results import header, publish

from canao import workflow
from canao.compiler.importer import INPUT_NAMES, BertExportWrapper, example_inputs
from canao.compiler.models import load_model
from canao.latency.protocol import Protocol, summarize, time_callable

PROTOCOLS = {"minilm": Protocol(warmup=2, repeats=10), "bert-base": Protocol(warmup=1, repeats=5)}


def torch_eager_row(model_name: str, threads: int, protocol: Protocol, seq: int) -> dict:
    loaded = load_model(model_name)
    wrapper = BertExportWrapper(loaded.module).eval()
    inputs = example_inputs(loaded.config.vocab_size, 1, seq)
    args = [torch.from_numpy(inputs[name]) for name in INPUT_NAMES]
    torch.set_num_threads(threads)
    with torch.inference_mode():
        stats = summarize(time_callable(lambda: wrapper(*args), protocol))
    return {
        "model": model_name,
        "target": "x86",
        "pipeline": "torch-eager",
        "shapes": f"1x{seq}",
        "threads": threads,
        "median_ms": stats.median_ms,
        "min_ms": stats.min_ms,
        "iqr_ms": stats.iqr_ms,
        "kernel_launches": None,
        "primfuncs": None,
        "vm_builtins": None,
        "build_s": 0.0,
        "max_abs_diff": 0.0,
        "device": "local",
        "cached": False,
    }


def run(models: list[str], threads: list[int], seq: int) -> pd.DataFrame:
    frames = []
    for model in models:
        protocol = PROTOCOLS.get(model, Protocol(warmup=1, repeats=5))
        with tempfile.TemporaryDirectory() as tmp:
            frames.append(
                workflow.bench(
                    model,
                    "x86",
                    ["default", "default-fused"],
                    1,
                    seq,
                    threads=list(threads),
                    protocol=protocol,
                    rpc=None,
                    cache=None,
                    workdir=Path(tmp),
                )
            )
        frames.append(pd.DataFrame([torch_eager_row(model, t, protocol, seq) for t in threads]))
    table = pd.concat(frames, ignore_index=True)
    # Ratios within one run, one machine: the honest way to compare on a shared box.
    eager = table[table.pipeline == "torch-eager"].set_index(["model", "threads"])["median_ms"]
    table["x_slower_than_torch"] = [
        row.median_ms / eager[(row.model, row.threads)] for row in table.itertuples()
    ]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="minilm,bert-base")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    table = run(args.models.split(","), [int(t) for t in args.threads.split(",")], args.seq)
    shown = table.drop(columns=["cached", "device"]).round(
        {"median_ms": 1, "min_ms": 1, "iqr_ms": 1, "build_s": 1, "x_slower_than_torch": 1}
    )
    publish(
        table,
        shown,
        "default_build",
        header("medians over the protocol's repeats (warm-up excluded)"),
    )


if __name__ == "__main__":
    main()
