"""AE-BERT, oBERT and magnitude pruning on SST-2 and RTE dev, measured with canao's compiler.

For each task, method and ratio: prune the cached fine-tuned MiniLM-L6 teacher
(structured: heads and FFN neurons, one-shot, then the same distillation
fine-tuning budget for every method), score dev accuracy, compile the pruned
model with the ``fast`` pipeline (checked against its PyTorch output) and time
it interleaved with the teacher in one process. One oBERT unstructured row per
task shows size without speed.

    python benchmarks/pruning.py [--tasks sst2,rte] [--ratios 0.3,0.5,0.7] [--steps 60]

Prints the table; writes benchmarks/results/pruning.{csv,md}.
"""

from __future__ import annotations

import argparse
import os

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts

import pandas as pd
from _results import RESULTS, header, publish

from canao.nas.distill import cache_root
from canao.nas.prune import PruneConfig
from canao.nas.prune_job import PruneJob, run_prune


def row(task: str, config: PruneConfig, report: dict) -> dict[str, object]:
    pruned, teacher, latency = report["pruned"], report["teacher"], report["latency"]
    return {
        "task": task,
        "method": config.method,
        "granularity": config.granularity,
        "ratio": config.ratio,
        "dev_accuracy": pruned["accuracy"],
        "teacher_accuracy": teacher["accuracy"],
        "encoder_nonzero_m": pruned["encoder_nonzero"] / 1e6,
        "params_m": pruned["params"] / 1e6,
        "sparse_mb": pruned["sparse_mb"],
        "latency_ms": latency["median_ms"]["pruned"],
        "teacher_ms": latency["median_ms"]["teacher"],
        "speedup": latency["speedup"],
        "finetune_steps": config.finetune_steps,
        "arch": report["arch"],
        "layer_ratios": report["layer_ratios"],
    }


METHOD_ORDER = {"aebert": 0, "obert": 1, "magnitude": 2}


def ordered(table: pd.DataFrame) -> pd.DataFrame:
    """Rows by task (as first seen), structured before unstructured, method, ratio.

    Appended runs would otherwise land in the order they happened to be run.
    """
    tasks = {task: i for i, task in enumerate(dict.fromkeys(table.task))}
    key = table.assign(
        _task=table.task.map(tasks),
        _unstructured=table.granularity != "structured",
        _method=table.method.map(METHOD_ORDER),
    )
    columns = ["_task", "_unstructured", "_method", "ratio"]
    return table.loc[key.sort_values(columns, kind="stable").index].reset_index(drop=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="sst2,rte")
    parser.add_argument("--methods", default="aebert,obert,magnitude")
    parser.add_argument("--ratios", default="0.3,0.5,0.7")
    parser.add_argument("--steps", type=int, default=60, help="fine-tuning steps after pruning")
    parser.add_argument(
        "--teacher-examples",
        type=int,
        default=6400,
        help="training examples for each teacher (default 6400; RTE has 2490)",
    )
    parser.add_argument(
        "--append", action="store_true", help="keep the rows already in results/pruning.csv"
    )
    args = parser.parse_args()
    detail = (
        f"MiniLM-L6 teachers ({args.teacher_examples} training examples at most), seq 128, "
        "1 thread; finetune_steps: distillation steps after pruning"
    )
    rows = []
    if args.append and (RESULTS / "pruning.csv").is_file():
        rows = pd.read_csv(RESULTS / "pruning.csv").to_dict("records")
    for task in args.tasks.split(","):
        runs = [
            PruneConfig(
                method=m,
                ratio=float(r),
                finetune_steps=args.steps,
                fisher_batches=16,
                aebert_candidates=8,
                aebert_rounds=1,
            )
            for m in args.methods.split(",")
            for r in args.ratios.split(",")
        ]
        runs.append(
            PruneConfig(
                method="obert",
                ratio=0.5,
                granularity="unstructured",
                finetune_steps=args.steps,
                fisher_batches=16,
            )
        )
        for config in runs:
            out = (
                cache_root()
                / "bench-prune"
                / f"{task}-{config.method}-{config.granularity}-{config.ratio}"
            )
            print(f"{task}: {config.method} {config.granularity} {config.ratio}", flush=True)
            job = PruneJob(
                task=task, config=config, out=out, teacher_examples=args.teacher_examples
            )
            report = run_prune(job, log=lambda m: None)
            rows.append(row(task, config, report))
            # Published after every run: a long benchmark interrupted keeps what it measured.
            table = ordered(pd.DataFrame(rows))
            shown = table.drop(columns=["layer_ratios"]).round(4)
            publish(table, shown, "pruning", f"Pruning on dev. {header(detail)}")


if __name__ == "__main__":
    main()
