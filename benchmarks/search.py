"""A real compiler-aware search on SST-2 with measured x86 latencies.

1. ``canao search`` (teacher: MiniLM-L6 fine-tuned on SST-2; super-network trained
   with sandwich distillation; every candidate compiled with the ``fast``
   pipeline, checked against PyTorch and timed at ``--threads``).
2. Uniform shrinking at the same latencies: fewer layers at full width, and all
   six layers uniformly narrower, scored with the same super-network and
   compiler; the Pareto front's best accuracy at no more latency is set beside each.
3. The winner, the teacher (both canao builds) and BERT-base shapes on LiteRT
   fp32, timed side by side (interleaved blocks) in one process at the same threads.

    python benchmarks/search.py [--trials 200] [--controller evolution] [--latency-ms 7]

Prints the tables; writes benchmarks/results/search_*.{csv,md} and search_pareto.png.
Rerunning resumes the stored study (teacher, super-network, latencies and
accuracies are cached).
"""

from __future__ import annotations

import argparse
import os
import shutil
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts; --threads must match

import numpy as np
import pandas as pd
from _results import RESULTS, header, publish

from canao.nas.distill import SupernetConfig, cache_root
from canao.nas.job import SearchJob, SearchOutcome, run_job
from canao.nas.space import ArchConfig

WIDTHS = (0.25, 0.5, 0.75)


def uniform_table(outcome: SearchOutcome) -> pd.DataFrame:
    """Uniform shrinking vs the Pareto front at no more latency."""
    space, evaluator = outcome.evaluator.supernet.space, outcome.evaluator
    points: list[tuple[str, ArchConfig]] = []
    for layers in space.layer_choices[:-1]:
        points.append((f"{layers} layers, full width", space.uniform(layers, 1.0)))
    for fraction in WIDTHS:
        points.append(
            (
                f"{space.max_layers} layers, width x{fraction}",
                space.uniform(space.max_layers, fraction),
            )
        )
    front = outcome.pareto
    rows = []
    for label, arch in points:
        accuracy = evaluator.accuracy(arch)
        latency = evaluator.latency(arch).median_ms
        faster = front[front["latency_ms"] <= latency]
        best = faster.loc[faster["accuracy"].idxmax()] if not faster.empty else None
        rows.append(
            {
                "uniform": label,
                "arch": arch.key,
                "latency_ms": latency,
                "accuracy": accuracy,
                "pareto_accuracy": None if best is None else best["accuracy"],
                "pareto_latency_ms": None if best is None else best["latency_ms"],
                "pareto_arch": None if best is None else best["arch"],
            }
        )
    table = pd.DataFrame(rows)
    table["pareto_gain"] = table["pareto_accuracy"] - table["accuracy"]
    return table


def side_by_side(outcome: SearchOutcome, threads: int, repeats: int) -> pd.DataFrame:
    """Winner and teacher (canao) and BERT-base on LiteRT fp32, interleaved in one process."""
    from canao.compiler.importer import example_inputs
    from canao.compiler.models import load_model
    from canao.latency.baselines import make_runner
    from canao.latency.protocol import Protocol, summarize, time_interleaved
    from canao.workflow import checked_inference

    seq = int(outcome.summary["job"]["seq"])  # type: ignore[index]
    teacher = Path(str(outcome.evaluator.supernet.info["teacher"]))
    calls, accuracy = {}, {}
    for name, model in (
        ("canao winner", outcome.out / "winner" / "model"),
        ("canao teacher (MiniLM-L6)", teacher),
    ):
        calls[name], _ = checked_inference(model, seq)
    accuracy["canao winner"] = outcome.winner["accuracy"]
    accuracy["canao teacher (MiniLM-L6)"] = outcome.summary["teacher"]["accuracy"]  # type: ignore[index]
    bert_base = load_model("bert-base")
    litert = make_runner("litert-fp32", bert_base, batch=1, seq=seq, threads=threads)
    calls["LiteRT fp32 BERT-base shapes"] = litert.bind(
        example_inputs(bert_base.config.vocab_size, 1, seq)
    )
    seconds = time_interleaved(calls, Protocol(warmup=3, repeats=repeats))
    rows = []
    for name, values in seconds.items():
        stats = summarize(values)
        rows.append(
            {
                "system": name,
                "threads": threads,
                "median_ms": stats.median_ms,
                "iqr_ms": stats.iqr_ms,
                "dev_accuracy": accuracy.get(name, np.nan),
            }
        )
    table = pd.DataFrame(rows)
    reference = table.loc[table["system"] == "LiteRT fp32 BERT-base shapes", "median_ms"].iloc[0]
    table["speedup_vs_litert_bert_base"] = reference / table["median_ms"]
    return table


def scale_summary(outcome: SearchOutcome) -> pd.DataFrame:
    """Issue 17's figures: trials, minutes, seconds per candidate, MAPE, band, violations."""
    summary, trials = outcome.summary, outcome.trials
    measured = trials[trials["state"] == "COMPLETE"]
    build = measured["build_s"].dropna() if "build_s" in measured else pd.Series(dtype=float)
    noise = summary.get("latency_noise") or {}
    monotonicity = summary.get("monotonicity") or {}
    rows = {
        "trials complete": len(measured),
        "search minutes (this run)": round(float(summary["search_seconds_this_run"] or 0) / 60, 1),
        "median build s / candidate": round(float(build.median()), 2) if len(build) else None,
        "median build s after the first 20": (
            round(float(build.iloc[20:].median()), 2) if len(build) > 20 else None
        ),
        "predictor held-out MAPE": summary.get("predictor"),
        "anchor noise band (p10-p90 / median)": noise.get("band"),
        "sub-network pairs checked": monotonicity.get("pairs"),
        "monotonicity violations beyond the band": monotonicity.get("violations"),
    }
    return pd.DataFrame({"figure": list(rows), "value": [str(v) for v in rows.values()]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--trials", type=int, default=200)
    parser.add_argument("--controller", default="evolution")
    parser.add_argument("--latency-ms", type=float, default=7.0)
    parser.add_argument("--supernet-steps", type=int, default=300)
    # 0: the whole training set (the teacher the shipped-model benchmark uses and caches).
    parser.add_argument("--teacher-examples", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--out", type=Path, default=cache_root() / "bench-search")
    parser.add_argument(
        "--objective",
        default="soft",
        help="reward (the README's figures used soft; canao search defaults to hard)",
    )
    args = parser.parse_args()
    if os.environ["TVM_NUM_THREADS"] != str(args.threads):
        parser.error(f"run with TVM_NUM_THREADS={args.threads} for --threads {args.threads}")
    job = SearchJob(
        task=args.task,
        objective=args.objective,
        controller=args.controller,
        trials=args.trials,
        latency_ms=args.latency_ms,
        threads=args.threads,
        supernet=SupernetConfig(steps=args.supernet_steps),
        teacher_examples=args.teacher_examples or None,
        out=args.out,
        study_name=f"bench-{args.task}-{args.controller}",
    )
    outcome = run_job(job)
    detail = (
        f"{args.task} dev, seq {job.seq}, batch 1, {args.threads} thread(s), "
        f"{args.controller}, {args.trials} trials, target {args.latency_ms} ms"
    )
    front = outcome.pareto[["arch", "params_m", "accuracy", "latency_ms", "predicted_ms"]]
    publish(outcome.pareto, front.round(4), "search_pareto", f"Pareto front. {header(detail)}")
    uniform = uniform_table(outcome)
    publish(
        uniform,
        uniform.round(4),
        "search_uniform",
        f"Uniform shrinking vs the front. {header(detail)}",
    )
    table = side_by_side(outcome, args.threads, args.repeats)
    summary = outcome.summary
    title = (
        f"Winner vs teacher vs BERT-base shapes on LiteRT fp32 (interleaved). {header(detail)}. "
        f"Search: {summary['trials']} in {summary['search_seconds_this_run']} s this run; "
        f"predictor held-out MAPE {summary['predictor']}"
    )
    publish(table, table.round(4), "search_winner", title)
    scale = scale_summary(outcome)
    publish(
        scale,
        scale,
        "search_scale",
        f"Search at scale: cost per candidate, noise band, monotonicity. {header(detail)}",
    )
    outcome.trials.to_csv(RESULTS / "search_trials.csv", index=False)
    shutil.copy(outcome.out / "pareto.png", RESULTS / "search_pareto.png")


if __name__ == "__main__":
    main()
