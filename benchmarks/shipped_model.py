"""The shipped model: SST-2, a MiniLM-L6 teacher on the whole training set, the search's
retrained winner against equal-latency baselines retrained with the same budget.

1. ``canao search`` on SST-2 (teacher fine-tuned on all 67k training sentences, cached;
   super-network; every candidate compiled, checked against PyTorch and timed); the top
   ``--retrain-top`` points of the Pareto front within the target are distilled alone for
   ``--retrain-steps`` and the best after retraining is exported.
2. Baselines, each cut from the teacher (importance-ordered as the super-network was, so
   narrowing keeps the most important units) and distilled alone with the same budget:
   - DistilBERT-style: every other layer at full width (3 of 6: layers 0, 2, 4);
   - uniform narrowing: all 6 layers, uniformly narrower, at the width whose measured
     latency is closest to the winner's.
3. Each baseline's rival: the most accurate Pareto point at no more search latency,
   retrained alone with the same budget and saved under ``front/`` beside the points the
   search retrained (a rival the search retrained is used as it saved it).
4. Teacher, winner, baselines and rivals timed side by side (interleaved) in one process.
5. Dominance: each baseline against the retrained front (a retrained point at no more
   latency and no less accuracy).

    TVM_NUM_THREADS=1 python benchmarks/shipped_model.py [--trials 40] [--retrain-steps 600]

Prints the tables; writes benchmarks/results/shipped_model.{csv,md}. Everything expensive
is cached under $CANAO_CACHE_DIR (teacher, super-network, latencies), so a rerun resumes.
"""

from __future__ import annotations

import argparse
import copy
import os
import time
from pathlib import Path

os.environ.setdefault("TVM_NUM_THREADS", "1")  # before TVM starts; --threads must match

import numpy as np
import pandas as pd
import torch
from _results import RESULTS, header, publish

from canao.nas.calibrate import calibrate_readout
from canao.nas.distill import SupernetConfig, batches, cache_root, load_teacher
from canao.nas.job import FRONT_DIR, SearchJob, SearchOutcome, retrain_winner, run_job
from canao.nas.retrain import RetrainConfig, retrain
from canao.nas.space import ArchConfig
from canao.nas.supernet import IMPORTANCE, extract, reorder_by_importance

WIDTHS = (0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
TEACHER_ROW = "teacher (MiniLM-L6, fine-tuned)"  # the table's first row, found again by --retime
RIVAL_ROW = "canao front point (retrained)"  # a baseline's equal-latency rival from the front


def ordered_teacher(outcome: SearchOutcome) -> torch.nn.Module:
    """The teacher with units importance-ordered exactly as the super-network's were."""
    supernet = outcome.evaluator.supernet
    config = SupernetConfig(**supernet.info["config"])  # type: ignore[arg-type]
    teacher, tokenizer = load_teacher(Path(str(supernet.info["teacher"])))
    assert outcome.evaluator.train is not None
    data = batches(
        tokenizer,
        outcome.evaluator.train,
        config.batch_size,
        config.max_length,
        np.random.default_rng(config.seed),
    )
    torch.manual_seed(config.seed)
    ordered = copy.deepcopy(teacher)
    rank = IMPORTANCE[config.importance]
    reorder_by_importance(
        ordered, rank(ordered, [next(data) for _ in range(config.importance_batches)])
    )
    return ordered


def baseline_archs(outcome: SearchOutcome) -> dict[str, tuple[ArchConfig, float]]:
    """Each baseline and its search latency (ms, anchored as the trials' are: timed once,
    since a second look-up returns the cache's unanchored median)."""
    space, evaluator = outcome.evaluator.supernet.space, outcome.evaluator
    assert outcome.winner is not None
    winner_ms = float(outcome.winner["latency_ms"])
    narrow = [space.uniform(space.max_layers, f) for f in WIDTHS]
    distil = space.uniform(space.max_layers // 2, 1.0)
    latency = {arch: evaluator.latency(arch).ranked_ms for arch in dict.fromkeys([*narrow, distil])}
    closest = min(dict.fromkeys(narrow), key=lambda arch: abs(latency[arch] - winner_ms))
    return {
        "DistilBERT-style (every other layer)": (distil, latency[distil]),
        "uniform narrowing (6 layers)": (closest, latency[closest]),
    }


def retrained_baselines(
    outcome: SearchOutcome, config: RetrainConfig, out: Path
) -> list[dict[str, object]]:
    evaluator = outcome.evaluator
    ordered = ordered_teacher(outcome)
    teacher_path = Path(str(evaluator.supernet.info["teacher"]))
    rows = []
    for name, (arch, latency_ms) in baseline_archs(outcome).items():
        model = extract(ordered, arch)
        # The same start as the search's candidates: the read-out calibrated on the same rows.
        assert evaluator.train is not None
        calibrate_readout(
            model,
            evaluator.supernet.tokenizer,
            evaluator.train,
            evaluator.calibrate,
            evaluator.max_length,
        )
        before = evaluator.score_model(model)
        started = time.perf_counter()
        assert evaluator.train is not None
        retrain(model, teacher_path, evaluator.train, config)
        after = evaluator.score_model(model)
        folder = out / "baselines" / arch.key
        model.save_pretrained(folder)
        evaluator.supernet.tokenizer.save_pretrained(folder)
        print(f"{name}: {arch.key} {before['accuracy']:.4f} -> {after['accuracy']:.4f}", flush=True)
        rows.append(
            {
                "model": name,
                "arch": arch.key,
                "search_latency_ms": latency_ms,
                "accuracy_before": before["accuracy"],
                "accuracy": after["accuracy"],
                "retrain_s": round(time.perf_counter() - started, 1),
                "folder": str(folder),
            }
        )
    return rows


def front_matches(
    outcome: SearchOutcome,
    job: SearchJob,
    baselines: list[dict[str, object]],
    retrained: pd.DataFrame,
) -> tuple[pd.DataFrame, dict[str, str]]:
    """Each baseline's equal-latency rival from the search: the most accurate Pareto point
    at no more search latency, retrained alone with the same budget and saved under
    ``front/`` to be timed beside the baseline.

    The search retrains the top of its front, near the target, and saves each point under
    ``front/`` (this run's: it clears the folder first); a baseline faster than those points
    could otherwise never be dominated however good the front below it is. Returns the
    retrained points (the search's and new ones) and baseline -> arch.
    """
    front = pd.read_csv(job.out / "pareto.csv")
    points, rivals = [retrained], {}
    for baseline in baselines:
        within = front[front["latency_ms"] <= float(baseline["search_latency_ms"])]  # type: ignore[arg-type]
        if within.empty:
            continue
        rival = within.sort_values(["accuracy", "latency_ms"], ascending=[False, True]).iloc[0]
        arch = str(rival["arch"])
        rivals[str(baseline["model"])] = arch
        if (job.out / FRONT_DIR / arch).is_dir():  # retrained by the search, or for a baseline
            continue
        model = outcome.evaluator.sub_network(ArchConfig.from_key(arch))
        info = retrain_winner(outcome.evaluator, model, job, print, what=f"front point {arch}")
        assert info is not None
        folder = job.out / FRONT_DIR / arch
        model.save_pretrained(folder)
        outcome.evaluator.supernet.tokenizer.save_pretrained(folder)
        row = {
            "arch": arch,
            "latency_ms": float(rival["latency_ms"]),
            "accuracy_before": info["before"]["accuracy"],  # type: ignore[index]
            "accuracy": info["after"]["accuracy"],  # type: ignore[index]
        }
        points.append(pd.DataFrame([row]))
    return pd.concat(points, ignore_index=True), rivals


def interleaved(folders: dict[str, Path], seq: int, repeats: int) -> dict[str, float]:
    from canao.latency.protocol import Protocol, summarize, time_interleaved
    from canao.workflow import checked_inference

    calls = {name: checked_inference(folder, seq)[0] for name, folder in folders.items()}
    seconds = time_interleaved(calls, Protocol(warmup=3, repeats=repeats))
    return {name: summarize(values).median_ms for name, values in seconds.items()}


def row_key(row: pd.Series) -> str:
    """A table row's name among the timed models (front points share one model name)."""
    name = str(row["model"])
    return f"{RIVAL_ROW} {row['arch']}" if name == RIVAL_ROW else name


def retime(args: argparse.Namespace) -> None:
    """Time the teacher, the winner and the baselines of an earlier run again, interleaved
    (a run's own timing shares the machine with its training; this one can wait for quiet)."""
    from canao.compiler.models import minilm_path
    from canao.nas.finetune import FinetuneConfig, teacher_dir
    from canao.nas.job import task_length
    from canao.nas.tasks import load_task

    earlier = pd.read_csv(RESULTS / "shipped_model.csv")
    data = load_task(args.task)
    teacher = teacher_dir(
        FinetuneConfig(task=args.task, max_length=task_length(data, 64)), minilm_path(), data
    )
    folders = {TEACHER_ROW: teacher}
    for _, row in earlier.iterrows():
        name, arch = str(row["model"]), str(row["arch"])
        if name.startswith("canao winner"):
            folders[name] = args.out / "winner" / "model"
        elif name == RIVAL_ROW:
            folders[row_key(row)] = args.out / FRONT_DIR / arch
        elif not name.startswith("teacher"):
            folders[name] = args.out / "baselines" / arch
    missing = [str(path) for path in folders.values() if not (path / "config.json").is_file()]
    if missing:
        raise SystemExit(f"--retime: no model in {', '.join(missing)} (run the benchmark first)")
    timed = interleaved(folders, args.seq, args.repeats)
    table = earlier.copy()
    table["interleaved_ms"] = [timed[row_key(row)] for _, row in table.iterrows()]
    table["speedup_vs_teacher"] = timed[TEACHER_ROW] / table["interleaved_ms"]
    detail = (
        f"re-timed interleaved ({args.repeats} repeats, seq {args.seq}, {args.threads} thread(s))"
    )
    publish(table, table.round(4), "shipped_model", f"The shipped model, {header(detail)}")


def dominated_by(front: pd.DataFrame, latency_ms: float, accuracy: float) -> str | None:
    """A retrained front point at no more latency and no less accuracy, if any."""
    better = front[(front["latency_ms"] <= latency_ms) & (front["accuracy"] >= accuracy)]
    return None if better.empty else str(better.iloc[0]["arch"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="sst2")
    parser.add_argument("--trials", type=int, default=40)
    parser.add_argument("--supernet-steps", type=int, default=300)
    parser.add_argument("--retrain-steps", type=int, default=600)
    parser.add_argument("--retrain-top", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=cache_root() / "bench-shipped")
    parser.add_argument(
        "--objective",
        default="soft",
        help="reward (the README's figures used soft; canao search defaults to hard)",
    )
    parser.add_argument(
        "--retime",
        action="store_true",
        help="only time the models of the last run again, interleaved (accuracies are kept)",
    )
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args()
    if os.environ["TVM_NUM_THREADS"] != str(args.threads):
        parser.error(f"run with TVM_NUM_THREADS={args.threads} for --threads {args.threads}")
    if args.retime:
        retime(args)
        return
    retrain_config = RetrainConfig(steps=args.retrain_steps)
    job = SearchJob(
        task=args.task,
        objective=args.objective,
        trials=args.trials,
        threads=args.threads,
        supernet=SupernetConfig(steps=args.supernet_steps),
        retrain=retrain_config,
        retrain_top=args.retrain_top,
        out=args.out,
        study_name=f"shipped-{args.task}",
    )
    started = time.perf_counter()
    outcome = run_job(job)
    if outcome.winner is None:
        raise SystemExit(f"no winner: {outcome.summary.get('no_winner')}")
    summary = outcome.summary
    teacher = summary["teacher"]  # type: ignore[index]
    retrained = pd.read_csv(args.out / "retrained.csv")
    baselines = retrained_baselines(outcome, retrain_config, args.out)
    retrained, rivals = front_matches(outcome, job, baselines, retrained)
    rival_folders = {
        f"{RIVAL_ROW} {arch}": args.out / FRONT_DIR / arch
        for arch in dict.fromkeys(rivals.values())
        if arch != str(outcome.winner["arch"])  # type: ignore[index]  # timed as the winner
    }
    folders = {
        "teacher": Path(str(outcome.evaluator.supernet.info["teacher"])),
        "winner": args.out / "winner" / "model",
        **{row["model"]: Path(str(row["folder"])) for row in baselines},  # type: ignore[misc]
        **rival_folders,
    }
    timed = interleaved(folders, job.seq, args.repeats)
    winner = summary["winner"]  # type: ignore[index]
    rows = [
        {
            "model": TEACHER_ROW,
            "arch": teacher["arch"],  # type: ignore[index]
            "search_latency_ms": teacher["latency_ms"],  # type: ignore[index]
            "accuracy_before": np.nan,
            "accuracy": teacher["accuracy"],  # type: ignore[index]
            "interleaved_ms": timed["teacher"],
        },
        {
            "model": "canao winner (retrained)",
            "arch": winner["arch"],  # type: ignore[index]
            "search_latency_ms": winner["latency_ms"],  # type: ignore[index]
            "accuracy_before": summary["retrain"]["before"]["accuracy"],  # type: ignore[index]
            "accuracy": summary["retrain"]["after"]["accuracy"],  # type: ignore[index]
            "interleaved_ms": timed["winner"],
        },
    ]
    for row in baselines:
        rows.append({**row, "interleaved_ms": timed[str(row["model"])]})
    for name in rival_folders:
        point = retrained[retrained["arch"] == name.removeprefix(f"{RIVAL_ROW} ")].iloc[0]
        rows.append(
            {
                "model": RIVAL_ROW,
                "arch": point["arch"],
                "search_latency_ms": point["latency_ms"],
                "accuracy_before": point["accuracy_before"],
                "accuracy": point["accuracy"],
                "interleaved_ms": timed[name],
            }
        )
    table = pd.DataFrame(rows).drop(columns=["folder", "retrain_s"], errors="ignore")
    table["speedup_vs_teacher"] = timed["teacher"] / table["interleaved_ms"]
    table["points_vs_teacher"] = 100 * (table["accuracy"] - float(teacher["accuracy"]))  # type: ignore[index]
    table["dominated_by"] = [
        dominated_by(retrained, float(r["search_latency_ms"]), float(r["accuracy"]))
        if str(r["model"]).startswith(("DistilBERT", "uniform"))
        else None
        for _, r in table.iterrows()
    ]
    minutes = (time.perf_counter() - started) / 60
    detail = (
        f"{args.task} dev ({len(outcome.evaluator.dev)} examples), seq {job.seq}, batch 1, "
        f"{args.threads} thread(s); {args.trials} trials, super-network {args.supernet_steps} "
        f"steps, retraining {args.retrain_steps} steps (batch {retrain_config.batch_size}) for "
        f"the top {args.retrain_top} and each baseline; {minutes:.0f} min this run"
    )
    publish(table, table.round(4), "shipped_model", f"The shipped model. {header(detail)}")
    print("\nretrained top of the front:\n" + retrained.round(4).to_string(index=False))


if __name__ == "__main__":
    main()
