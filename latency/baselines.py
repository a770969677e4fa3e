"""Baselines: PyTorch eager, ONNX Runtime and LiteRT (fp32, int8), measured the way canao is.

A speed-up claim is only as good as the baselines beside it, so every runtime
here sees the same model (:class:`~canao.compiler.importer.BertExportWrapper`),
the same int64 inputs (:func:`~canao.compiler.importer.example_inputs`), the
same :class:`~canao.latency.protocol.Protocol` (timed by
:func:`~canao.latency.protocol.time_callable`), a fixed thread count, and is
checked against PyTorch before its time is believed.

LiteRT models are converted by ``litert-torch``, whose dependencies pin
``typing-extensions<4.13`` and so break ``import tvm``. The converter
therefore runs as a subprocess in a virtual environment canao creates and
owns (``$CANAO_LITERT_VENV``, else ``$CANAO_CACHE_DIR/litert-venv``); it is
handed a ``torch.export`` program (same torch version on both sides) and
writes ``.tflite`` files, cached by model fingerprint and shapes. Running them
only needs ``ai-edge-litert``, which installs cleanly beside TVM.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
import venv
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from canao.compiler.importer import (
    INPUT_NAMES,
    BertExportWrapper,
    InputSpec,
    example_inputs,
    torch_reference,
)
from canao.compiler.models import LoadedModel, load_model
from canao.compiler.verify import Tolerance
from canao.errors import CanaoError, NumericsMismatchError
from canao.latency.protocol import (
    INTERLEAVED_ROUNDS,
    Measurement,
    Protocol,
    make_measurement,
    measurement_key,
    time_callable,
    time_interleaved,
)
from canao.locks import file_lock

if TYPE_CHECKING:
    from matplotlib.axes import Axes

SYSTEMS = ("torch-eager", "onnxruntime", "onnxruntime-int8", "litert-fp32", "litert-int8")
REFERENCE_SYSTEM = "litert-fp32"  # what edge deployments ship today: the bar to beat
SPEEDUP_COLUMN = f"speedup_vs_{REFERENCE_SYSTEM.replace('-', '_')}"
EXTRA = "canao[baselines]"
LITERT_TORCH_VERSION = "0.10.0"
LITERT_SIGNATURE = "serving_default"
BASELINE_PIPELINE = "baseline"  # Measurement.pipeline of every baseline row
QUANTIZED_SYSTEMS = frozenset({"litert-int8", "onnxruntime-int8"})  # differ from PyTorch

# One table for baselines and canao's own builds (see row_from_measurement).
COLUMNS = (
    "system",
    "threads",
    "median_ms",
    "min_ms",
    "iqr_ms",
    "mean_ms",
    "max_abs_diff",
    "tolerance",
    "model",
    "model_hash",
    "shapes",
    "runtime",
    "protocol",
    "device",
    "cpu_model",
    "measured_at",
)

_VENV_MARKER = "canao-venv.json"
_CONVERT_TIMEOUT_S = 3600


class BaselineUnavailable(CanaoError):
    """A baseline runtime (or its converter) is not installed or cannot be set up."""


class BaselineError(CanaoError):
    """A baseline could be set up but failed to convert or run the model."""


# --------------------------------------------------------------------------- imports


def _require(module: str, what: str) -> ModuleType:
    """Import an optional runtime, or say which extra brings it: the fix, not a traceback."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise BaselineUnavailable(f"{what} is not installed: pip install '{EXTRA}'") from None


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------- runners


class BaselineRunner(ABC):
    """One runtime holding one model at a fixed thread count.

    ``bind`` does the per-input work a deployment would do once (casts, feed
    dicts), so the timed callable is one inference: feed, run, fetch output.
    """

    name: str = ""
    runtime: str = ""  # package and version, for the table

    def __init__(self, threads: int) -> None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        self.threads = threads

    @abstractmethod
    def bind(self, inputs: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
        """A zero-argument callable running one inference on ``inputs``."""

    def run(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """One inference: float32 output, shaped like PyTorch's."""
        return np.asarray(self.bind(inputs)())

    def time(self, inputs: dict[str, np.ndarray], protocol: Protocol) -> list[float]:
        """Per-repeat seconds under ``protocol``, the same loop canao's non-TVM timings use."""
        return time_callable(self.bind(inputs), protocol)


class TorchEagerRunner(BaselineRunner):
    """PyTorch eager: what the model's authors run, and the numerics reference."""

    name = "torch-eager"

    def __init__(self, model: LoadedModel, threads: int) -> None:
        super().__init__(threads)
        self.wrapper = BertExportWrapper(model.module).eval()
        self.runtime = f"torch {_version('torch')}"

    def bind(self, inputs: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
        args = tuple(torch.from_numpy(np.ascontiguousarray(inputs[n])) for n in INPUT_NAMES)

        def infer() -> np.ndarray:
            # Set on every call: the count is process-wide and another runner may change it.
            torch.set_num_threads(self.threads)
            with torch.inference_mode():
                return self.wrapper(*args).numpy()

        return infer


class OnnxRuntimeRunner(BaselineRunner):
    """ONNX Runtime's CPU provider, all graph optimisations, ``threads`` intra-op threads."""

    name = "onnxruntime"

    def __init__(self, onnx_path: Path, threads: int, name: str = "onnxruntime") -> None:
        super().__init__(threads)
        self.name = name
        ort = _require("onnxruntime", "ONNX Runtime")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one graph, run sequentially: no second pool
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        self.session = ort.InferenceSession(
            str(onnx_path), options, providers=["CPUExecutionProvider"]
        )
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.runtime = f"onnxruntime {ort.__version__}"

    def bind(self, inputs: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
        feed = {
            name: np.ascontiguousarray(inputs[name], dtype=np.int64) for name in self.input_names
        }
        session = self.session
        return lambda: session.run(None, feed)[0]


class LiteRTRunner(BaselineRunner):
    """LiteRT's interpreter with the XNNPACK delegate, as on an Android/Linux edge device."""

    def __init__(self, tflite_path: Path, threads: int, name: str) -> None:
        super().__init__(threads)
        interpreter_mod = _require("ai_edge_litert.interpreter", "LiteRT (ai-edge-litert)")
        self.name = name
        self.interpreter = interpreter_mod.Interpreter(
            model_path=str(tflite_path), num_threads=threads
        )
        self.interpreter.allocate_tensors()
        self.delegated_nodes = _delegate_nodes(self.interpreter)
        if self.delegated_nodes == 0:
            # Without XNNPACK LiteRT is 5-7x slower: such a number would flatter canao.
            raise BaselineError(
                f"{tflite_path.name}: the XNNPACK delegate was not applied, so LiteRT would be "
                "timed on its slow reference kernels; check the ai-edge-litert build"
            )
        self.signature = self.interpreter.get_signature_runner(LITERT_SIGNATURE)
        details = self.signature.get_input_details()
        # litert-torch names positional inputs args_0.. in the order of INPUT_NAMES.
        self.input_map = {f"args_{i}": name for i, name in enumerate(INPUT_NAMES)}
        missing = set(self.input_map) - set(details)
        if missing:
            raise BaselineError(
                f"{tflite_path.name}: signature {LITERT_SIGNATURE!r} lacks inputs "
                f"{sorted(missing)} (has {sorted(details)})"
            )
        self.input_dtypes = {arg: details[arg]["dtype"] for arg in self.input_map}
        (self.output_name,) = self.signature.get_output_details()
        self.runtime = f"ai-edge-litert {_version('ai-edge-litert')} (XNNPACK)"

    def bind(self, inputs: dict[str, np.ndarray]) -> Callable[[], np.ndarray]:
        feed = {
            arg: np.ascontiguousarray(inputs[name], dtype=self.input_dtypes[arg])
            for arg, name in self.input_map.items()
        }
        signature, output = self.signature, self.output_name
        return lambda: signature(**feed)[output]


def _delegate_nodes(interpreter: Any) -> int:
    """Delegate kernels in the graph; LiteRT's only default delegate on CPU is XNNPACK."""
    ops = interpreter._get_ops_details()
    return sum(1 for op in ops if op["op_name"] == "DELEGATE")


# --------------------------------------------------------------------------- artifacts


def cache_dir() -> Path:
    """``$CANAO_CACHE_DIR``, else ``~/.cache/canao``: where converted models are kept."""
    return Path(os.environ.get("CANAO_CACHE_DIR") or Path.home() / ".cache" / "canao")


def default_litert_venv() -> Path:
    """``$CANAO_LITERT_VENV``, else ``<cache dir>/litert-venv`` (about 2 GB, built once)."""
    configured = os.environ.get("CANAO_LITERT_VENV")
    return Path(configured) if configured else cache_dir() / "litert-venv"


def export_program(model: LoadedModel, batch: int, seq: int) -> torch.export.ExportedProgram:
    """``torch.export`` of the wrapper at fixed shapes: one graph for ONNX and LiteRT alike."""
    sample = example_inputs(model.config.vocab_size, batch, seq)
    args = tuple(torch.from_numpy(sample[name]) for name in INPUT_NAMES)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's own pytree deprecations
        return torch.export.export(BertExportWrapper(model.module).eval(), args)


def _artifact_stem(model: LoadedModel, batch: int, seq: int) -> str:
    return f"{model.fingerprint}-b{batch}-s{seq}"


def onnx_model(model: LoadedModel, batch: int, seq: int, cache: Path | None = None) -> Path:
    """The model as ONNX (dynamo exporter, fixed shapes), cached by fingerprint and shapes."""
    _require("onnxscript", "The ONNX exporter (onnxscript)")
    folder = (cache or cache_dir()) / "baselines" / "onnx"
    path = folder / f"{_artifact_stem(model, batch, seq)}-torch{torch.__version__}.onnx"
    if path.is_file():
        return path
    folder.mkdir(parents=True, exist_ok=True)
    program = export_program(model, batch, seq)
    with tempfile.TemporaryDirectory(dir=folder) as tmp, _quiet_onnx_exporter():
        onnx_program = torch.onnx.export(
            program,
            input_names=list(INPUT_NAMES),
            output_names=["output"],
            dynamo=True,
            verbose=False,
        )
        staged = Path(tmp) / path.name
        onnx_program.save(str(staged))  # weights inline: MiniLM to BERT-large are < 2 GB
        os.replace(staged, path)
    return path


@contextlib.contextmanager
def _quiet_onnx_exporter() -> Iterator[None]:
    """Hide the exporter's warnings (e.g. "torchvision is not installed"): noise, not news."""
    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registry.level
    registry.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        registry.setLevel(level)


def litert_model(
    model: LoadedModel,
    batch: int,
    seq: int,
    variant: str = "fp32",
    *,
    cache: Path | None = None,
    venv_dir: Path | None = None,
) -> Path:
    """The model as a ``.tflite`` file (``variant`` fp32 or int8 dynamic range).

    Both variants come out of one conversion and are cached together, keyed by
    fingerprint, shapes and converter version: a second call returns at once.
    """
    if variant not in ("fp32", "int8"):
        raise ValueError(f"variant must be 'fp32' or 'int8', got {variant!r}")
    paths = _litert_paths(model, batch, seq, cache)
    if not paths[variant].is_file():
        _convert_litert(model, batch, seq, paths, venv_dir)
    return paths[variant]


def _litert_paths(model: LoadedModel, batch: int, seq: int, cache: Path | None) -> dict[str, Path]:
    folder = (cache or cache_dir()) / "baselines" / "litert"
    stem = f"{_artifact_stem(model, batch, seq)}-litert-torch{LITERT_TORCH_VERSION}"
    return {variant: folder / f"{stem}-{variant}.tflite" for variant in ("fp32", "int8")}


# Runs inside the LiteRT venv (its torch equals ours, so the .pt2 loads as saved).
_CONVERT_SCRIPT = """
import json
import sys

import numpy as np
import torch
import litert_torch
from ai_edge_quantizer import quantizer, recipe

request = json.loads(open(sys.argv[1], encoding="utf-8").read())
program = torch.export.load(request["program"])
sample = np.load(request["inputs"])
args = tuple(torch.from_numpy(sample[name]) for name in request["input_names"])
litert_torch.convert(program.module(), args).export(request["fp32"])
# Dynamic range: int8 channel-wise weights, activations quantised on the fly.
dynamic = quantizer.Quantizer(request["fp32"], recipe.dynamic_wi8_afp32())
dynamic.quantize().export_model(request["int8"], overwrite=True)
"""


def _convert_litert(
    model: LoadedModel, batch: int, seq: int, paths: dict[str, Path], venv_dir: Path | None
) -> None:
    """Export here, convert in the LiteRT venv, then move both files into the cache."""
    python = ensure_litert_venv(venv_dir)
    folder = paths["fp32"].parent
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        work = Path(tmp)
        torch.export.save(export_program(model, batch, seq), str(work / "model.pt2"))
        np.savez(work / "inputs.npz", **example_inputs(model.config.vocab_size, batch, seq))
        request = {
            "program": str(work / "model.pt2"),
            "inputs": str(work / "inputs.npz"),
            "input_names": list(INPUT_NAMES),
            "fp32": str(work / "fp32.tflite"),
            "int8": str(work / "int8.tflite"),
        }
        (work / "request.json").write_text(json.dumps(request), encoding="utf-8")
        (work / "convert.py").write_text(_CONVERT_SCRIPT, encoding="utf-8")
        _run_checked(
            [str(python), str(work / "convert.py"), str(work / "request.json")],
            f"converting {model.name} to LiteRT",
            timeout=_CONVERT_TIMEOUT_S,
        )
        for variant, path in paths.items():
            os.replace(work / f"{variant}.tflite", path)


def _isolated_env() -> dict[str, str]:
    """Our environment minus what would leak the main environment's packages into the venv."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


def _run_checked(command: list[str], what: str, timeout: float) -> None:
    try:
        done = subprocess.run(
            command,
            env=_isolated_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BaselineError(f"{what} timed out after {timeout:.0f} s") from None
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-12:])
        raise BaselineError(f"{what} failed (exit {done.returncode}):\n{tail}")


def onnx_int8_model(model: LoadedModel, batch: int, seq: int, cache: Path | None = None) -> Path:
    """ONNX Runtime's dynamic int8 (``quantize_dynamic``: int8 weights, activations quantized
    per tensor at run time, what its docs recommend for BERT), cached beside the fp32 file."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    source = onnx_model(model, batch, seq, cache)
    path = source.with_name(source.stem + "-dynamic-int8.onnx")
    if path.is_file():
        return path
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        staged = Path(tmp) / path.name
        quantize_dynamic(str(source), str(staged), weight_type=QuantType.QInt8)
        os.replace(staged, path)
    return path


# --------------------------------------------------------------------------- the venv


def litert_venv_requirements() -> list[str]:
    """What the converter venv holds: our exact torch (so .pt2 files load), litert-torch.

    The exact torch version string (e.g. ``2.13.0+cpu``) keeps pip on the same
    build as ours; a bare ``2.13.0`` could fetch PyPI's CUDA build (GBs).
    """
    return [
        f"torch=={_version_or_fail('torch')}",
        f"litert-torch=={LITERT_TORCH_VERSION}",
        f"transformers=={_version_or_fail('transformers')}",
    ]


def _version_or_fail(package: str) -> str:
    version = _version(package)
    if version == "?":
        raise BaselineUnavailable(f"{package} is not installed in this environment")
    return version


def ensure_litert_venv(venv_dir: Path | None = None) -> Path:
    """The converter venv's python, creating the venv on first use (a minute or two).

    A plain venv, not ``--system-site-packages``: the converter's pins must not
    meet TVM's. A marker file records what was installed; a venv without it
    (interrupted) or with other requirements (versions moved) is rebuilt.
    """
    root = venv_dir or default_litert_venv()
    python = root / "bin" / "python"
    wanted = litert_venv_requirements()
    if _venv_ready(root, wanted):
        return python
    root.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(root.parent / f".{root.name}.lock"):
        if not _venv_ready(root, wanted):  # another process may have built it meanwhile
            _build_venv(root, wanted)
    return python


def _venv_ready(root: Path, wanted: list[str]) -> bool:
    marker = root / _VENV_MARKER
    if not marker.is_file() or not (root / "bin" / "python").exists():
        return False
    try:
        return json.loads(marker.read_text(encoding="utf-8")).get("requirements") == wanted
    except (OSError, json.JSONDecodeError):
        return False


def _build_venv(root: Path, wanted: list[str]) -> None:
    started = time.perf_counter()
    shutil.rmtree(root, ignore_errors=True)
    try:
        venv.EnvBuilder(with_pip=True, clear=True).create(root)
    except (OSError, subprocess.CalledProcessError) as err:
        raise BaselineUnavailable(
            f"cannot create the LiteRT converter venv at {root} ({err}); on Debian/Ubuntu "
            "install python3-venv, or set CANAO_LITERT_VENV to a writable folder"
        ) from None
    python = str(root / "bin" / "python")
    extra = shlex.split(os.environ.get("CANAO_LITERT_PIP_ARGS", ""))
    pip = [python, "-m", "pip", "install", "--disable-pip-version-check", "-q", *extra]
    torch_pin, *rest = wanted
    hint = (
        '; set CANAO_LITERT_PIP_ARGS (e.g. "--extra-index-url '
        'https://download.pytorch.org/whl/cpu") if pip cannot find this torch build'
    )
    constraints = root / "constraints.txt"
    constraints.write_text(torch_pin + "\n", encoding="utf-8")
    # torch first and alone, then the rest constrained to it: pip never swaps it for another.
    for step in ([torch_pin], ["-c", str(constraints), *rest]):
        try:
            _run_checked([*pip, *step], f"installing {' '.join(step)} into {root}", 3600)
        except BaselineError as err:
            raise BaselineUnavailable(f"{err}{hint}") from None
    _run_checked([python, "-c", "import litert_torch, ai_edge_quantizer"], f"checking {root}", 600)
    marker = {"requirements": wanted, "build_seconds": round(time.perf_counter() - started, 1)}
    (root / _VENV_MARKER).write_text(json.dumps(marker), encoding="utf-8")


# --------------------------------------------------------------------------- runners by name


def make_runner(
    system: str, model: LoadedModel, *, batch: int, seq: int, threads: int
) -> BaselineRunner:
    """The runner for ``system`` (one of :data:`SYSTEMS`), converting the model if needed."""
    if system == "torch-eager":
        return TorchEagerRunner(model, threads)
    if system == "onnxruntime":
        _require("onnxruntime", "ONNX Runtime")  # before a pointless export
        return OnnxRuntimeRunner(onnx_model(model, batch, seq), threads)
    if system == "onnxruntime-int8":
        _require("onnxruntime", "ONNX Runtime")
        return OnnxRuntimeRunner(onnx_int8_model(model, batch, seq), threads, system)
    if system in ("litert-fp32", "litert-int8"):
        _require("ai_edge_litert.interpreter", "LiteRT (ai-edge-litert)")
        variant = system.removeprefix("litert-")
        return LiteRTRunner(litert_model(model, batch, seq, variant), threads, system)
    raise ValueError(f"unknown baseline {system!r}; baselines: {', '.join(SYSTEMS)}")


# --------------------------------------------------------------------------- numerics


def check_numerics(
    runner: BaselineRunner,
    inputs: dict[str, np.ndarray],
    reference: np.ndarray,
    tolerance: Tolerance | None = None,
) -> tuple[float, float]:
    """(max abs diff vs PyTorch, bound applied); raises for an fp32 runtime outside the bound.

    Quantised runtimes are expected to differ (~0.2 on MiniLM's hidden states for
    int8 dynamic range): their diff is reported and the bound is NaN, but a
    non-finite output is still an error.
    """
    output = runner.run(inputs)
    if output.shape != reference.shape:
        raise NumericsMismatchError(
            f"{runner.name}: output shape {output.shape} differs from PyTorch's {reference.shape}"
        )
    diff = float(np.abs(output.astype(np.float64) - reference).max())
    if runner.name in QUANTIZED_SYSTEMS:
        if not np.isfinite(diff):
            raise NumericsMismatchError(f"{runner.name}: output is not finite")
        return diff, float("nan")
    bound = (tolerance or Tolerance()).bound(reference)
    if not diff <= bound:  # also catches NaN
        raise NumericsMismatchError(
            f"{runner.name} ({runner.runtime}, {runner.threads} threads): max abs diff "
            f"{diff:.3g} vs PyTorch exceeds tolerance {bound:.3g}"
        )
    return diff, bound


# --------------------------------------------------------------------------- timing


# --------------------------------------------------------------------------- the table


def row_from_measurement(
    measurement: Measurement,
    system: str,
    *,
    max_abs_diff: float = float("nan"),
    tolerance: float = float("nan"),
    runtime: str = "",
) -> dict[str, object]:
    """One table row from a canao Measurement: how baselines and canao's TVM builds meet.

    For a canao build: ``row_from_measurement(run.measurement, "canao-fast",
    max_abs_diff=diff)``, append to :func:`compare`'s table, then
    :func:`add_speedups`.
    """
    proto = measurement.protocol
    return {
        "system": system,
        "threads": measurement.threads,
        "median_ms": measurement.median_ms,
        "min_ms": measurement.min_ms,
        "iqr_ms": measurement.iqr_ms,
        "mean_ms": measurement.mean_ms,
        "max_abs_diff": max_abs_diff,
        "tolerance": tolerance,
        "model": measurement.model,
        "model_hash": measurement.model_hash,
        "shapes": measurement.shapes,
        "runtime": runtime or f"{measurement.target}/{measurement.pipeline}",
        "protocol": f"warmup={proto.warmup},repeats={proto.repeats},number={proto.number}",
        "device": measurement.device,
        "cpu_model": measurement.cpu_model,
        "measured_at": measurement.measured_at,
    }


def add_speedups(df: pd.DataFrame, reference: str = REFERENCE_SYSTEM) -> pd.DataFrame:
    """A copy with ``speedup_vs_litert_fp32``: reference median / row median.

    Rows compare only with the reference row of the same model, shapes and
    thread count (NaN where there is none), so a combined table of baselines
    and canao builds at several thread counts gets one correct column.
    """
    out = df.copy()
    keys = ["model_hash", "shapes", "threads"]
    ref = out.loc[out["system"] == reference, [*keys, "median_ms"]]
    ref = ref.drop_duplicates(subset=keys, keep="last").rename(columns={"median_ms": "_ref_ms"})
    merged = out[keys].merge(ref, on=keys, how="left")
    out[SPEEDUP_COLUMN] = merged["_ref_ms"].to_numpy() / out["median_ms"].to_numpy()
    return out


def _measure_threads(
    runners: dict[str, BaselineRunner],
    model: LoadedModel,
    inputs: dict[str, np.ndarray],
    reference: np.ndarray,
    spec: InputSpec,
    protocol: Protocol,
    tolerance: Tolerance | None,
    rounds: int,
) -> list[dict[str, object]]:
    """Check then time every runner at one thread count; one row each."""
    numerics = {
        name: check_numerics(r, inputs, reference, tolerance) for name, r in runners.items()
    }
    seconds = time_interleaved({n: r.bind(inputs) for n, r in runners.items()}, protocol, rounds)
    rows = []
    for name, runner in runners.items():
        measurement = make_measurement(
            seconds[name],
            key=measurement_key(
                model.fingerprint, name, BASELINE_PIPELINE, spec.shapes(), runner.threads
            ),
            model=model.name,
            model_hash=model.fingerprint,
            target=name,
            pipeline=BASELINE_PIPELINE,
            shapes=spec.shapes(),
            threads=runner.threads,
            protocol=protocol,
        )
        diff, bound = numerics[name]
        rows.append(
            row_from_measurement(
                measurement, name, max_abs_diff=diff, tolerance=bound, runtime=runner.runtime
            )
        )
    return rows


def compare(
    model: str | Path | LoadedModel,
    threads: Sequence[int],
    seq: int = 128,
    batch: int = 1,
    protocol: Protocol | None = None,
    systems: Sequence[str] | None = None,
    tolerance: Tolerance | None = None,
    rounds: int = INTERLEAVED_ROUNDS,
) -> pd.DataFrame:
    """Every baseline at every thread count: one row per (system, threads), with speed-ups.

    Conversions happen first (cached); then, per thread count, each runtime is
    checked against PyTorch and all are timed interleaved. Columns are
    :data:`COLUMNS` plus the speed-up; add canao rows with
    :func:`row_from_measurement` and recompute with :func:`add_speedups`.
    """
    loaded = model if isinstance(model, LoadedModel) else load_model(model)
    chosen = list(systems or SYSTEMS)
    unknown = [s for s in chosen if s not in SYSTEMS]
    if unknown:
        raise ValueError(f"unknown baselines {unknown}; baselines: {', '.join(SYSTEMS)}")
    protocol = protocol or Protocol()
    spec = InputSpec(batch, seq)
    inputs = example_inputs(loaded.config.vocab_size, batch, seq)
    reference = torch_reference(loaded.module, inputs)
    previous_threads = torch.get_num_threads()
    rows: list[dict[str, object]] = []
    try:
        for count in threads:
            runners = {
                s: make_runner(s, loaded, batch=batch, seq=seq, threads=count) for s in chosen
            }
            rows += _measure_threads(
                runners, loaded, inputs, reference, spec, protocol, tolerance, rounds
            )
            del runners  # free sessions/interpreters (and their thread pools) before the next
    finally:
        torch.set_num_threads(previous_threads)
    return add_speedups(pd.DataFrame(rows, columns=list(COLUMNS)))


# --------------------------------------------------------------------------- outputs


def write_outputs(df: pd.DataFrame, out_dir: Path, stem: str = "baselines") -> list[Path]:
    """``<stem>.csv`` and ``<stem>.png`` (median ms per system and thread count, IQR bars).

    The figure is drawn on an Agg canvas directly, never through pyplot, so no
    display is needed and no global backend is changed.
    """
    _require("matplotlib", "matplotlib")
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = add_speedups(df)  # recomputed: rows may have been added since
    csv_path = out_dir / f"{stem}.csv"
    table.to_csv(csv_path, index=False)
    groups = list(table.groupby(["model", "shapes"], sort=False))
    figure = Figure(figsize=(8, 3.6 * max(1, len(groups))), layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots(max(1, len(groups)), 1, squeeze=False)[:, 0]
    for ax, ((model, shapes), group) in zip(axes, groups, strict=False):
        _draw_bars(ax, group, f"{model}, {str(shapes).split(',')[0]}")
    png_path = out_dir / f"{stem}.png"
    figure.savefig(png_path, dpi=120)
    return [csv_path, png_path]


def _draw_bars(ax: Axes, group: pd.DataFrame, title: str) -> None:
    """Grouped bars: thread counts on x, one bar per system, labelled with the speed-up."""
    systems = list(dict.fromkeys(group["system"]))
    counts = sorted(group["threads"].unique())
    width = 0.8 / len(systems)
    for i, system in enumerate(systems):
        rows = group[group["system"] == system].set_index("threads").reindex(counts)
        xs = np.arange(len(counts)) + (i - (len(systems) - 1) / 2) * width
        bars = ax.bar(
            xs, rows["median_ms"], width, yerr=rows["iqr_ms"] / 2, capsize=2, label=system
        )
        labels = [f"{s:.2f}x" if np.isfinite(s) else "" for s in rows[SPEEDUP_COLUMN]]
        ax.bar_label(bars, labels=labels, fontsize=7, padding=2)
    ax.set_xticks(np.arange(len(counts)), [f"{c} thread{'' if c == 1 else 's'}" for c in counts])
    ax.set_ylabel("median latency (ms)")
    ax.set_title(f"{title}; labels: speed-up vs {REFERENCE_SYSTEM}", fontsize=9)
    ax.legend(fontsize=8)
