"""Super-network unit ordering: first-order importance vs oBERT's structured saliency.

The super-network (issue 6) is the teacher with heads, FFN neurons and hidden
channels sorted by importance; every candidate is a slice of the first units.
A better ordering is one whose slices are more accurate *before* any
distillation, so this scores each ordering by the dev accuracy of
uniformly shrunk slices of the fine-tuned teacher, with no training at all:

- ``none``: the teacher's own unit order (the floor);
- ``first-order``: ``sum |dL/dmask|`` (Michel et al.; DynaBERT), canao's default;
- ``obert``: ``1 / (2 [F^-1]_jj)`` from the block empirical Fisher of the same
  mask gradients (oBERT, structured), per layer for heads and for neurons.

Both orderings see the same training batches. Widths keep the same fraction
of heads and of FFN neurons in every layer, with the full hidden size, then
with the hidden size cut as well.

    python benchmarks/supernet_ordering.py [--task sst2] [--batches 32] [--teacher-examples 6400]

Prints the table; writes benchmarks/results/supernet_ordering.{csv,md}.
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from _results import header, publish

from canao.nas.distill import batches, load_teacher
from canao.nas.finetune import accuracy
from canao.nas.prune_job import PruneJob, teacher_for
from canao.nas.space import ArchConfig
from canao.nas.supernet import IMPORTANCE, extract, full_arch, reorder_by_importance
from canao.nas.tasks import load_task

# (fraction of heads and neurons kept, hidden size): slices of MiniLM-L6 (12 heads, 1536, 384).
WIDTHS = ((1.0, 384), (0.75, 384), (0.5, 384), (0.25, 384), (0.5, 288), (0.5, 192))


def sliced(full: ArchConfig, fraction: float, hidden: int) -> ArchConfig:
    heads = max(1, round(full.heads[0] * fraction))
    heads = min(heads, hidden // full.head_dim)  # a head needs head_dim channels
    ffn = max(1, round(full.ffn[0] * fraction))
    layers = full.num_layers
    return ArchConfig(hidden, (heads,) * layers, (ffn,) * layers, full.head_dim)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--batches", type=int, default=32, help="gradient batches (32 examples)")
    parser.add_argument("--teacher-examples", type=int, default=6400)
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_task(args.task)
    job = PruneJob(task=args.task, teacher_examples=args.teacher_examples, out=Path("unused"))
    teacher_path = teacher_for(job, log=print)
    teacher, tokenizer = load_teacher(teacher_path)
    max_length = 128 if data["train"].is_pair else 64
    stream = batches(tokenizer, data["train"], 32, max_length, np.random.default_rng(0))
    shared = [next(stream) for _ in range(args.batches)]  # the same batches for every ordering
    rows = []
    for ordering in ("none", *IMPORTANCE):
        model = copy.deepcopy(teacher)
        started = time.perf_counter()
        if ordering != "none":
            reorder_by_importance(model, IMPORTANCE[ordering](model, shared))
        seconds = time.perf_counter() - started
        for fraction, hidden in WIDTHS:
            arch = sliced(full_arch(model), fraction, hidden)
            score = accuracy(extract(model, arch), tokenizer, data["dev"], max_length)
            print(f"{ordering:12s} {arch.key:48s} {score:.4f}", flush=True)
            rows.append(
                {
                    "ordering": ordering,
                    "heads_neurons_kept": fraction,
                    "hidden": hidden,
                    "arch": arch.key,
                    "dev_accuracy": score,
                    "ranking_s": round(seconds, 1),
                }
            )
    table = pd.DataFrame(rows)
    shown = table.pivot_table(
        index=["heads_neurons_kept", "hidden"], columns="ordering", values="dev_accuracy"
    ).reset_index()
    shown = shown.sort_values(["hidden", "heads_neurons_kept"], ascending=False).round(4)
    detail = (
        f"{args.task} dev, MiniLM-L6 teacher ({args.teacher_examples} training examples), "
        f"orderings from {args.batches} batches of 32; slices scored with no training"
    )
    publish(table, shown, "supernet_ordering", f"Super-network ordering. {header(detail)}")


if __name__ == "__main__":
    main()
