"""The ``canao`` command line."""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from canao.compiler.pipelines import DEFAULT_PIPELINE, PRECISIONS
from canao.errors import CanaoError

EPILOG = (
    "MODEL: 'minilm' (default, offline pretrained MiniLM-L6), a local Hugging Face folder, "
    "a BertConfig .json file, or a shape preset such as 'bert-base' (random weights)."
)


def _int_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _seq(text: str) -> int | None:
    if text in ("dynamic", "symbolic"):
        return None
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(
            f"--seq takes a positive length or 'dynamic', got {text!r}"
        )
    return int(text)


def _add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default="minilm", metavar="MODEL", help=EPILOG)
    parser.add_argument("--target", default="x86", help="x86 (default), arm64 or cuda")
    parser.add_argument("--batch", type=int, default=1, help="batch size (default 1)")
    parser.add_argument(
        "--seq", type=_seq, default=128, help="sequence length, or 'dynamic' (default 128)"
    )
    parser.add_argument(
        "--head",
        choices=("base", "classification"),
        default="base",
        help="export the encoder (last hidden state) or a sequence-classification head",
    )
    parser.add_argument("--rpc", metavar="HOST:PORT", help="remote device: RPC server or tracker")
    parser.add_argument("--key", help="device key at the RPC tracker named by --rpc")
    parser.add_argument(
        "--rpc-timeout", type=float, default=20.0, help="seconds to wait for the device"
    )


def _add_precision_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=tuple(PRECISIONS),
        help="int8: dynamic-range int8 dense layers (pipeline fast-int8; x86 AVX-512 VNNI, "
        "AVX-VNNI or AVX2, aarch64 i8mm, dotprod or NEON; on AVX2 without VNNI activations "
        "are 7-bit, and --pipeline fast-int8-full-range keeps 8), timed and scored as int8; "
        "fp32: pipeline fast (the default). Replaces --pipeline",
    )


def _pipelines(args: argparse.Namespace) -> list[str]:
    """``--pipeline`` as a list, or the pipeline ``--precision`` names (not both)."""
    named = [p for p in args.pipeline.split(",") if p]
    if getattr(args, "precision", None) is None:
        return named
    if named != [DEFAULT_PIPELINE]:
        raise CanaoError(
            f"--precision {args.precision} picks the pipeline itself "
            f"({PRECISIONS[args.precision]}); drop --pipeline {args.pipeline}"
        )
    return [PRECISIONS[args.precision]]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="canao",
        description="Compiler-aware architecture search of BERT models for edge devices.",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    comp = commands.add_parser(
        "compile", help="compile MODEL with TVM, check it against PyTorch, export library+manifest"
    )
    _add_model_args(comp)
    comp.add_argument(
        "--pipeline", default=DEFAULT_PIPELINE, help="build pipeline (default: fast; `canao list`)"
    )
    _add_precision_arg(comp)
    comp.add_argument("-o", "--output", required=True, type=Path, help="artifact folder")
    comp.set_defaults(run=_cmd_compile)

    bench = commands.add_parser("bench", help="compile MODEL and measure its latency")
    _add_model_args(bench)
    bench.add_argument(
        "--pipeline",
        default=DEFAULT_PIPELINE,
        help="pipeline(s), comma-separated, e.g. fast,default-fused (default: fast)",
    )
    _add_precision_arg(bench)
    bench.add_argument("--threads", type=_int_list, help="thread counts, e.g. 1,2 (default: all)")
    bench.add_argument("--repeats", type=int, default=20, help="timed repeats (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed warm-up runs (default 3)")
    bench.add_argument("--cache", type=Path, help="SQLite latency cache (default: ~/.cache/canao)")
    bench.add_argument("--no-cache", action="store_true", help="neither read nor write the cache")
    bench.add_argument("--refresh", action="store_true", help="measure even if cached")
    bench.add_argument("--csv", type=Path, help="also write the table as CSV")
    bench.add_argument(
        "--fusion-report",
        action="store_true",
        help="print the dataflow graph's size after each fusion pass (fast pipelines)",
    )
    bench.set_defaults(run=_cmd_bench)

    cmp_ = commands.add_parser(
        "compare",
        help="canao's build vs LiteRT (fp32, int8), ONNX Runtime and torch, measured alike",
    )
    cmp_.add_argument("model", nargs="?", default="minilm", metavar="MODEL", help=EPILOG)
    cmp_.add_argument("--threads", type=_int_list, default=[1], help="e.g. 1,2 (default 1)")
    cmp_.add_argument("--seq", type=int, default=128, help="sequence length (default 128)")
    cmp_.add_argument("--batch", type=int, default=1)
    cmp_.add_argument("--pipeline", default=DEFAULT_PIPELINE, help="canao pipeline(s), e.g. fast")
    _add_precision_arg(cmp_)
    cmp_.add_argument(
        "--systems",
        default="torch-eager,onnxruntime,onnxruntime-int8,litert-fp32,litert-int8",
        help="baselines to run (comma-separated)",
    )
    cmp_.add_argument("--repeats", type=int, default=20)
    cmp_.add_argument("--warmup", type=int, default=3)
    cmp_.add_argument(
        "-o", "--output", type=Path, default=Path("compare"), help="folder for CSV + PNG"
    )
    cmp_.set_defaults(run=_cmd_compare)

    _add_search_parser(commands)
    _add_prune_parser(commands)
    _add_predict_parser(commands)

    lst = commands.add_parser("list", help="list targets, pipelines and model presets")
    lst.set_defaults(run=_cmd_list)
    return parser


def _add_search_parser(commands: argparse._SubParsersAction) -> None:
    search = commands.add_parser(
        "search",
        help="compiler-aware architecture search (no options: a short demo on offline data)",
        description=(
            "Fine-tune a teacher, train a weight-sharing super-network, then search "
            "depth/width variants whose latency is measured on the compiled artifact."
        ),
    )
    _add_task_args(search, "movie-reviews")
    search.add_argument("--target", default="x86", help="x86 (default), arm64 or cuda")
    search.add_argument(
        "--latency-ms", type=float, help="latency target (default: half the teacher's)"
    )
    search.add_argument(
        "--controller", default="evolution", help="evolution (default), rl, tpe, nsga2, random"
    )
    search.add_argument("--trials", type=int, default=20, help="trials in the study (default 20)")
    search.add_argument(
        "--budget-minutes",
        type=float,
        metavar="M",
        help="stop starting trials after M minutes of searching (teacher and super-network "
        "training not counted); whichever of --trials and this comes first ends the search",
    )
    search.add_argument(
        "--objective",
        choices=("soft", "hard", "pareto"),
        default="hard",
        help="hard (default): the most accurate model within the latency target; soft: "
        "MnasNet's soft constraint, which also rewards being faster than the target; pareto: "
        "two objectives",
    )
    search.add_argument("--weight", type=float, default=-0.07, help="soft-constraint exponent")
    search.add_argument(
        "--storage",
        help="Optuna storage URL (default sqlite:///OUT/study.db); share it to "
        "run several workers on one search",
    )
    search.add_argument(
        "--artifacts",
        metavar="STORE",
        help="share the study's teacher and super-network with workers on other machines: "
        "a folder they all mount, or s3://bucket/prefix (the first worker trains and uploads, "
        "the others download)",
    )
    search.add_argument("--study-name", default="canao-search")
    search.add_argument("-o", "--out", type=Path, default=Path("canao-search"))
    search.add_argument("--seq", type=int, default=128, help="sequence length timed (default 128)")
    search.add_argument("--threads", type=int, default=1, help="threads timed (default 1)")
    search.add_argument("--seed", type=int, default=0)
    _add_teacher_args(search)
    search.add_argument(
        "--supernet-steps", type=int, default=200, help="super-network training steps"
    )
    search.add_argument(
        "--importance",
        choices=("first-order", "obert"),
        default="first-order",
        help="how the super-network ranks heads/neurons/channels before slicing "
        "(obert: oBERT's structured Fisher saliency)",
    )
    search.add_argument(
        "--retrain-steps",
        type=int,
        default=300,
        help="distil the winner alone from the teacher for N steps before export (0: off)",
    )
    search.add_argument(
        "--retrain-top",
        type=int,
        default=1,
        metavar="K",
        help="retrain the winner and the next K-1 most accurate Pareto points within the "
        "target; the best after retraining is exported (retrained.csv lists them)",
    )
    search.add_argument("--dev-limit", type=int, help="score candidates on the first N dev rows")
    search.add_argument(
        "--calibrate",
        type=int,
        default=512,
        metavar="N",
        help="refit each candidate's classifier on N training examples before it is scored "
        "(read-out calibration; 0: score the shared read-out)",
    )
    search.add_argument(
        "--predictor-skip",
        type=float,
        help="skip candidates predicted slower than this multiple of the target",
    )
    search.add_argument(
        "--screen",
        type=float,
        metavar="FRACTION",
        help="predictor screens: once fitted, build and time a candidate only when its "
        "predicted reward is in the top FRACTION of those measured (e.g. 0.3); the rest "
        "keep the predicted latency (trials.csv latency_source)",
    )
    search.add_argument("--no-export", action="store_true", help="do not export the winner")
    search.add_argument("--rpc", metavar="HOST:PORT", help="remote device: RPC server or tracker")
    search.add_argument("--key", help="device key at the RPC tracker named by --rpc")
    _add_precision_arg(search)
    search.set_defaults(run=_cmd_search)


def _add_teacher_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("teacher")
    group.add_argument(
        "--teacher",
        help="minilm (default: the offline MiniLM-L6), a local Hugging Face BERT folder or a "
        "hub id; a classifier for the task is used as it is, a base model is fine-tuned",
    )
    group.add_argument(
        "--teacher-epochs", type=int, help="epochs when the teacher is fine-tuned (default 1)"
    )
    group.add_argument(
        "--teacher-examples",
        type=int,
        help="training examples for the teacher's fine-tuning (default: the whole training set)",
    )


def _add_task_args(parser: argparse.ArgumentParser, default: str) -> None:
    data = parser.add_argument_group("task data")
    data.add_argument(
        "--task",
        help=f"{default} (default), a GLUE name (sst2, rte, mrpc, ...), movie-reviews, "
        "hub:glue/<task>, a data file (CSV, TSV with or without header, JSON Lines, Parquet; "
        "dev is held out of it) or a folder of train/validation(dev)/test files",
    )
    data.add_argument("--train", metavar="FILE", help="training file (instead of --task)")
    data.add_argument(
        "--dev", metavar="FILE", help="dev file with --train (default: 10%% held out of train)"
    )
    data.add_argument(
        "--text-columns",
        metavar="A[,B]",
        type=lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
        help="text column(s) of the files: names, or 0-based positions in header-less files",
    )
    data.add_argument("--label-column", metavar="Y", help="label column of the files")
    parser.set_defaults(default_task=default)


def _task(args: argparse.Namespace):  # -> str | TaskSpec
    """The task the data flags name: a plain name/path where that says it all, else a TaskSpec."""
    from canao.nas.tasks import TaskSpec

    source = args.task if args.task is not None or args.train else args.default_task
    if args.train is None and args.dev is None and not args.text_columns and not args.label_column:
        return source
    return TaskSpec(source, args.train, args.dev, args.text_columns or None, args.label_column)


def _cmd_search(args: argparse.Namespace) -> int:
    from canao.nas.distill import SupernetConfig
    from canao.nas.job import SearchJob, run_job
    from canao.nas.retrain import RetrainConfig

    job = SearchJob(
        task=_task(args),
        target=args.target,
        latency_ms=args.latency_ms,
        controller=args.controller,
        trials=args.trials,
        budget_minutes=args.budget_minutes,
        objective=args.objective,
        weight=args.weight,
        storage=args.storage,
        artifacts=args.artifacts,
        study_name=args.study_name,
        out=args.out,
        seq=args.seq,
        threads=args.threads,
        seed=args.seed,
        teacher=args.teacher,
        teacher_epochs=args.teacher_epochs or 1,
        teacher_examples=args.teacher_examples,
        supernet=SupernetConfig(
            steps=args.supernet_steps, seed=args.seed, importance=args.importance
        ),
        retrain=RetrainConfig(steps=args.retrain_steps, seed=args.seed),
        retrain_top=args.retrain_top,
        precision=args.precision or "fp32",
        dev_limit=args.dev_limit,
        calibrate=args.calibrate,
        predictor_skip=args.predictor_skip,
        screen=args.screen,
        rpc=_rpc_address(args),
        export_winner=not args.no_export,
    )
    run_job(job)
    return 0


def _add_prune_parser(commands: argparse._SubParsersAction) -> None:
    prune = commands.add_parser(
        "prune",
        help="prune a fine-tuned teacher (oBERT, AE-BERT, magnitude), then compile and time it",
    )
    _add_precision_arg(prune)
    prune.add_argument("--method", default="obert", help="obert (default), aebert, magnitude")
    prune.add_argument("--ratio", type=float, default=0.5, help="fraction removed (default 0.5)")
    prune.add_argument(
        "--granularity",
        default="structured",
        help="structured (heads and FFN neurons; default), unstructured, block4",
    )
    _add_task_args(prune, "rte")
    _add_teacher_args(prune)
    prune.add_argument("--stages", type=int, default=1, help="1: one-shot; more: cubic gradual")
    prune.add_argument("--finetune-steps", type=int, default=200)
    prune.add_argument("--threads", type=int, default=1)
    prune.add_argument("--seq", type=int, default=128)
    prune.add_argument("--seed", type=int, default=0)
    prune.add_argument("--no-measure", action="store_true", help="skip compiling and timing")
    prune.add_argument("-o", "--out", type=Path, default=Path("canao-prune"))
    prune.set_defaults(run=_cmd_prune)


def _cmd_prune(args: argparse.Namespace) -> int:
    from canao.nas.prune import PruneConfig
    from canao.nas.prune_job import PruneJob, run_prune
    from canao.nas.tasks import load_task, num_labels
    from canao.nas.teacher import resolve_teacher

    config = PruneConfig(
        method=args.method,
        ratio=args.ratio,
        granularity=args.granularity,
        stages=args.stages,
        finetune_steps=args.finetune_steps,
        seed=args.seed,
    )  # raises PruningError on a bad method, ratio or granularity
    task = _task(args)
    data = load_task(task)  # a bad task or teacher fails before anything is trained
    resolve_teacher(args.teacher, num_labels(data), data["train"].label_names)
    job = PruneJob(
        task=task,
        teacher=args.teacher,
        teacher_epochs=args.teacher_epochs,
        teacher_examples=args.teacher_examples,
        config=config,
        out=args.out,
        seq=args.seq,
        threads=args.threads,
        measure=not args.no_measure,
        precision=args.precision or "fp32",
    )
    run_prune(job)
    return 0


def _add_predict_parser(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser(
        "predict",
        help="classify texts with a shipped model (a search winner), running its compiled library",
    )
    predict.add_argument("folder", type=Path, metavar="DIR", help="e.g. canao-search/winner")
    predict.add_argument("texts", nargs="*", metavar="TEXT", help="texts to classify")
    predict.add_argument(
        "--file",
        type=Path,
        help="texts from a file: one per line (.txt; pairs tab-separated), or a CSV, TSV, "
        "JSON Lines or Parquet file whose text column(s) are detected or named",
    )
    predict.add_argument(
        "--text-columns",
        metavar="A[,B]",
        type=lambda text: tuple(c.strip() for c in text.split(",") if c.strip()),
        help="text column(s) of --file",
    )
    predict.add_argument(
        "--pairs", action="store_true", help="sentence pairs: TEXT arguments taken two by two"
    )
    predict.add_argument("--json", action="store_true", help="one JSON object per line")
    predict.add_argument("--rpc", metavar="HOST:PORT", help="run on a board: RPC server/tracker")
    predict.add_argument("--key", help="device key at the RPC tracker named by --rpc")
    predict.set_defaults(run=_cmd_predict)


def _cmd_predict(args: argparse.Namespace) -> int:
    import json

    from canao.deploy import load, read_texts

    texts = read_texts(args.texts, args.file, args.pairs, args.text_columns)
    with load(args.folder, rpc=_rpc_address(args)) as predictor:
        predictions = predictor.predict(texts)
    for item in predictions:
        if args.json:
            text = list(item.text) if isinstance(item.text, tuple) else item.text
            row = {"text": text, "label": item.label, "probabilities": item.probabilities}
            print(json.dumps(row, ensure_ascii=False))
        else:
            shown = " ||| ".join(item.text) if isinstance(item.text, tuple) else item.text
            print(f"{item.label}\t{item.probabilities[item.label]:.4f}\t{shown}")
    return 0


def _rpc_address(args: argparse.Namespace):  # -> RPCAddress | None
    from canao.latency.rpc import RPCAddress

    if args.key and not args.rpc:
        raise CanaoError("--key names a device at a tracker: give the tracker with --rpc HOST:PORT")
    return RPCAddress.parse(args.rpc, args.key) if args.rpc else None


def _cmd_compile(args: argparse.Namespace) -> int:
    from canao import workflow

    rpc = _rpc_address(args)
    (pipeline,) = _pipelines(args) if args.precision else (args.pipeline,)
    compiled = workflow.compile_and_verify(
        args.model,
        args.target,
        pipeline,
        args.batch,
        args.seq,
        args.head,
        rpc,
        args.rpc_timeout,
    )
    folder = workflow.export(compiled, args.output)
    numerics = compiled.numerics or {}
    kernels = compiled.kernels.summary()
    print(
        f"compiled {compiled.model.name} for {args.target} ({pipeline}) "
        f"in {compiled.build_seconds:.1f} s -> {folder}"
    )
    print("kernels: " + ", ".join(f"{k}={v}" for k, v in kernels.items()))
    int8 = compiled.int8_kernel()
    if int8 is not None:  # AVX2's default kernel quantizes activations to 7 bits
        print(f"int8 kernel: {int8['kernel']}, {int8['activation_bits']}-bit activations")
    if "max_abs_diff" in numerics:
        print(
            f"numerics vs PyTorch ({numerics['device']}): max abs diff "
            f"{numerics['max_abs_diff']:.2e} <= {numerics['tolerance']:.2e}"
        )
        if "fp32_max_abs_diff" in numerics:
            print(
                f"  (against {numerics['reference']}; the fp32 model is "
                f"{numerics['fp32_max_abs_diff']:.2e} away: the quantization error)"
            )
    else:
        print(f"numerics: {numerics.get('reason', 'not checked')}")
    return 0


def _cmd_bench(args: argparse.Namespace) -> int:
    from canao import workflow
    from canao.latency.cache import LatencyCache
    from canao.latency.protocol import Protocol

    rpc = _rpc_address(args)
    protocol = Protocol(warmup=args.warmup, repeats=args.repeats)
    cache = None if args.no_cache else LatencyCache(args.cache)
    pipelines = _pipelines(args)
    with tempfile.TemporaryDirectory(prefix="canao-bench-") as tmp:
        table = workflow.bench(
            args.model,
            args.target,
            pipelines,
            args.batch,
            args.seq,
            args.head,
            threads=args.threads or [None],
            protocol=protocol,
            rpc=rpc,
            cache=cache,
            refresh=args.refresh,
            workdir=Path(tmp),
            rpc_timeout_s=args.rpc_timeout,
        )
    print(workflow.format_table(table))
    if args.fusion_report:
        for pipeline in pipelines:
            print(f"\nfusion report: {args.model}, {pipeline}")
            print(workflow.fusion_report(args.model, args.target, pipeline, args.batch, args.seq))
    if args.csv:
        args.csv.parent.mkdir(parents=True, exist_ok=True)
        table.to_csv(args.csv, index=False)
        print(f"wrote {args.csv}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from canao import workflow
    from canao.latency.baselines import write_outputs
    from canao.latency.protocol import Protocol

    with tempfile.TemporaryDirectory(prefix="canao-compare-") as tmp:
        table = workflow.compare_with_baselines(
            args.model,
            args.threads,
            args.seq,
            args.batch,
            pipelines=_pipelines(args),
            systems=[s for s in args.systems.split(",") if s],
            protocol=Protocol(warmup=args.warmup, repeats=args.repeats),
            workdir=Path(tmp),
        )
    print(workflow.format_comparison(table))
    for path in write_outputs(table, args.output, stem="compare"):
        print(f"wrote {path}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    from canao.compiler.models import PRESETS
    from canao.compiler.pipelines import PIPELINES
    from canao.compiler.targets import TARGETS

    print("targets:")
    for name, spec in TARGETS.items():
        print(f"  {name:10s} {spec.description}")
    print("pipelines: " + ", ".join(PIPELINES))
    print("model presets: minilm (pretrained), " + ", ".join(PRESETS))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `canao predict DIR --pairs "a" "b"`: argparse gives texts after an option back as extra.
    if extra and hasattr(args, "texts") and not any(e.startswith("-") for e in extra):
        args.texts = [*args.texts, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return int(args.run(args))
    except CanaoError as err:
        print(f"canao: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("canao: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
