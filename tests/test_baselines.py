"""Baselines: each runtime converts and runs a small BERT, matches PyTorch, and is tabled."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from canao.compiler.importer import example_inputs, torch_reference
from canao.compiler.models import LoadedModel, load_model
from canao.compiler.verify import Tolerance
from canao.errors import NumericsMismatchError
from canao.latency import baselines
from canao.latency.baselines import (
    COLUMNS,
    QUANTIZED_SYSTEMS,
    SPEEDUP_COLUMN,
    SYSTEMS,
    BaselineRunner,
    BaselineUnavailable,
    add_speedups,
    check_numerics,
    compare,
    default_litert_venv,
    litert_model,
    make_runner,
    row_from_measurement,
    time_interleaved,
    write_outputs,
)
from canao.latency.protocol import Protocol, make_measurement
from tests.conftest import write_config

# Resolved before conftest points CANAO_CACHE_DIR at a fresh folder per test: the
# converter venv (~2 GB, a minute to build) is shared on purpose, like the arm64 root.
_SHARED_VENV = default_litert_venv()
SEQ = 32


@pytest.fixture(autouse=True)
def _shared_litert_venv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANAO_LITERT_VENV", str(_SHARED_VENV))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> LoadedModel:
    return load_model(write_config(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def inputs(tiny: LoadedModel) -> dict[str, np.ndarray]:
    return example_inputs(tiny.config.vocab_size, 1, SEQ)


@pytest.fixture(scope="module")
def reference(tiny: LoadedModel, inputs: dict[str, np.ndarray]) -> np.ndarray:
    return torch_reference(tiny.module, inputs)


@pytest.fixture(scope="module")
def litert_cache(tmp_path_factory: pytest.TempPathFactory, tiny: LoadedModel) -> Path:
    """Both .tflite variants of the tiny model, converted once in the shared venv."""
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed (canao[baselines])")
    cache = tmp_path_factory.mktemp("litert-cache")
    try:
        litert_model(tiny, 1, SEQ, "fp32", cache=cache, venv_dir=_SHARED_VENV)
    except BaselineUnavailable as err:  # pip could not install the converter here
        pytest.skip(f"LiteRT converter venv cannot be built: {err}")
    return cache


def _runner_with_cache(
    system: str, model: LoadedModel, cache: Path, threads: int
) -> BaselineRunner:
    variant = system.removeprefix("litert-")
    path = litert_model(model, 1, SEQ, variant, cache=cache, venv_dir=_SHARED_VENV)
    return baselines.LiteRTRunner(path, threads, system)


# --------------------------------------------------------------------------- runtimes


def test_torch_eager_is_the_reference(tiny: LoadedModel, inputs, reference) -> None:
    runner = make_runner("torch-eager", tiny, batch=1, seq=SEQ, threads=1)
    diff, bound = check_numerics(runner, inputs, reference)
    assert diff == 0.0 and bound == Tolerance().bound(reference)
    assert len(runner.time(inputs, Protocol(warmup=1, repeats=3))) == 3


def test_onnxruntime_matches_pytorch(tiny: LoadedModel, inputs, reference) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (canao[baselines])")
    runner = make_runner("onnxruntime", tiny, batch=1, seq=SEQ, threads=2)
    options = runner.session.get_session_options()  # type: ignore[attr-defined]
    assert (options.intra_op_num_threads, options.inter_op_num_threads) == (2, 1)
    output = runner.run(inputs)
    assert output.shape == reference.shape and output.dtype == np.float32
    diff, bound = check_numerics(runner, inputs, reference)
    assert diff <= bound
    # The export is cached: a second runner (another thread count) does not re-export.
    onnx_files = list((baselines.cache_dir() / "baselines" / "onnx").glob("*.onnx"))
    assert len(onnx_files) == 1
    make_runner("onnxruntime", tiny, batch=1, seq=SEQ, threads=1)
    assert list((baselines.cache_dir() / "baselines" / "onnx").glob("*.onnx")) == onnx_files


def test_onnxruntime_dynamic_int8_is_quantized_and_close(
    tiny: LoadedModel, inputs, reference
) -> None:
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (canao[baselines])")
    import onnx

    runner = make_runner("onnxruntime-int8", tiny, batch=1, seq=SEQ, threads=1)
    path = next((baselines.cache_dir() / "baselines" / "onnx").glob("*-dynamic-int8.onnx"))
    ops = {node.op_type for node in onnx.load(str(path)).graph.node}
    assert ops & {"MatMulInteger", "DynamicQuantizeLinear", "DynamicQuantizeMatMul"}, ops
    diff, bound = check_numerics(runner, inputs, reference)
    assert np.isnan(bound) and 0 < diff < 0.1 * np.abs(reference).max()  # lossy, not broken


@pytest.mark.slow
def test_litert_fp32_matches_pytorch(tiny, inputs, reference, litert_cache: Path) -> None:
    runner = _runner_with_cache("litert-fp32", tiny, litert_cache, threads=2)
    assert runner.delegated_nodes > 0  # type: ignore[attr-defined]  # XNNPACK is on
    diff, bound = check_numerics(runner, inputs, reference)
    assert diff <= bound


@pytest.mark.slow
def test_litert_int8_is_quantized_and_close(tiny, inputs, reference, litert_cache: Path) -> None:
    fp32 = litert_model(tiny, 1, SEQ, "fp32", cache=litert_cache)
    int8 = litert_model(tiny, 1, SEQ, "int8", cache=litert_cache)
    assert int8.stat().st_size < fp32.stat().st_size / 2  # int8 weights, not a copy
    runner = _runner_with_cache("litert-int8", tiny, litert_cache, threads=1)
    diff, bound = check_numerics(runner, inputs, reference)
    assert np.isnan(bound)  # reported, not enforced
    # Dynamic-range error is real but small next to the hidden states' scale.
    assert 1e-5 < diff < 0.1 * float(np.abs(reference).max())


@pytest.mark.slow
def test_litert_cache_makes_second_conversion_instant(
    tiny: LoadedModel, litert_cache: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = litert_model(tiny, 1, SEQ, "int8", cache=litert_cache)

    def no_subprocess(*args: object, **kwargs: object) -> None:
        raise AssertionError("a cached conversion must not start the converter")

    monkeypatch.setattr(baselines.subprocess, "run", no_subprocess)
    monkeypatch.setattr(baselines, "ensure_litert_venv", no_subprocess)
    started = time.perf_counter()
    again = litert_model(tiny, 1, SEQ, "int8", cache=litert_cache)
    assert again == first and time.perf_counter() - started < 0.5
    # Other shapes are another artifact: that one would need the converter.
    with pytest.raises(AssertionError, match="must not start"):
        litert_model(tiny, 1, SEQ + 8, "fp32", cache=litert_cache)


def test_venv_with_other_requirements_is_stale(tmp_path: Path) -> None:
    root = tmp_path / "venv"
    (root / "bin").mkdir(parents=True)
    (root / "bin" / "python").touch()
    wanted = baselines.litert_venv_requirements()
    assert wanted[0].startswith("torch==") and "litert-torch==0.10.0" in wanted
    assert not baselines._venv_ready(root, wanted)  # no marker: interrupted build
    (root / "canao-venv.json").write_text(json.dumps({"requirements": ["torch==0.1"]}))
    assert not baselines._venv_ready(root, wanted)
    (root / "canao-venv.json").write_text(json.dumps({"requirements": wanted}))
    assert baselines._venv_ready(root, wanted)


@pytest.mark.parametrize(
    ("system", "modules", "what"),
    [
        ("onnxruntime", ["onnxruntime"], "ONNX Runtime"),
        ("litert-fp32", ["ai_edge_litert", "ai_edge_litert.interpreter"], "LiteRT"),
    ],
)
def test_missing_runtime_names_the_extra(
    tiny: LoadedModel, monkeypatch: pytest.MonkeyPatch, system: str, modules: list[str], what: str
) -> None:
    for module in modules:
        monkeypatch.setitem(sys.modules, module, None)  # makes `import module` fail
    monkeypatch.setattr(baselines, "ensure_litert_venv", pytest.fail)  # fails before converting
    with pytest.raises(BaselineUnavailable, match=rf"{what}.*pip install 'canao\[baselines\]'"):
        make_runner(system, tiny, batch=1, seq=SEQ, threads=1)


def test_unknown_system_is_rejected(tiny: LoadedModel) -> None:
    with pytest.raises(ValueError, match="unknown baseline"):
        make_runner("tensorrt", tiny, batch=1, seq=SEQ, threads=1)
    with pytest.raises(ValueError, match="unknown baselines"):
        compare(tiny, [1], seq=SEQ, systems=["torch-eager", "tvm"])


# --------------------------------------------------------------------------- numerics


class _Fixed(BaselineRunner):
    """Returns a fixed array: lets the numerics check be tested without a runtime."""

    def __init__(self, name: str, output: np.ndarray) -> None:
        super().__init__(1)
        self.name, self.output = name, output

    def bind(self, inputs: dict[str, np.ndarray]):
        return lambda: self.output


def test_fp32_outside_tolerance_is_an_error(inputs, reference) -> None:
    with pytest.raises(NumericsMismatchError, match="exceeds tolerance"):
        check_numerics(_Fixed("onnxruntime", reference + 0.5), inputs, reference)
    with pytest.raises(NumericsMismatchError, match="exceeds tolerance"):
        check_numerics(_Fixed("litert-fp32", reference * np.nan), inputs, reference)
    with pytest.raises(NumericsMismatchError, match="shape"):
        check_numerics(_Fixed("onnxruntime", reference[:, :1]), inputs, reference)


def test_int8_error_is_reported_not_raised(inputs, reference) -> None:
    diff, bound = check_numerics(_Fixed("litert-int8", reference + 0.25), inputs, reference)
    assert diff == pytest.approx(0.25) and np.isnan(bound)
    with pytest.raises(NumericsMismatchError, match="not finite"):
        check_numerics(_Fixed("litert-int8", reference * np.inf), inputs, reference)


# --------------------------------------------------------------------------- timing


def test_time_interleaved_blocks_rotate_and_count() -> None:
    log: list[str] = []
    calls = {name: (lambda name=name: log.append(name)) for name in ("a", "b", "c")}
    seconds = time_interleaved(calls, Protocol(warmup=1, repeats=7, number=2), rounds=3)
    assert {name: len(s) for name, s in seconds.items()} == {"a": 7, "b": 7, "c": 7}
    # Blocks of 3, 2, 2 repeats; each block starts with the warm-up, first system rotating.
    assert log.count("a") == 3 * 1 + 7 * 2
    starts = [log[0], log[1 + 3 * 2 + (1 + 3 * 2) * 2]]
    assert starts == ["a", "b"]
    with pytest.raises(ValueError, match="rounds"):
        time_interleaved(calls, Protocol(), rounds=0)


# --------------------------------------------------------------------------- the table


def _row(system: str, threads: int, median_s: float, shapes: str = "input_ids=1x128") -> dict:
    measurement = make_measurement(
        [median_s] * 3,
        key=f"{system}|{threads}",
        model="tiny",
        model_hash="h",
        target=system,
        pipeline="baseline",
        shapes=shapes,
        threads=threads,
        protocol=Protocol(repeats=3),
    )
    return row_from_measurement(measurement, system, max_abs_diff=1e-6, tolerance=1e-3)


def test_add_speedups_per_thread_count_and_shape() -> None:
    rows = [
        _row("litert-fp32", 1, 0.020),
        _row("onnxruntime", 1, 0.040),
        _row("litert-fp32", 2, 0.012),
        _row("canao-fast", 2, 0.006),  # a canao build appended by the caller
        _row("canao-fast", 1, 0.010, shapes="input_ids=1x64"),  # no reference at this shape
    ]
    df = add_speedups(pd.DataFrame(rows))
    assert list(df.columns) == [*COLUMNS, SPEEDUP_COLUMN]
    keys = df[["system", "threads", "shapes"]].itertuples(index=False, name=None)
    speedup = dict(zip(keys, df[SPEEDUP_COLUMN], strict=True))
    assert speedup["litert-fp32", 1, "input_ids=1x128"] == pytest.approx(1.0)
    assert speedup["onnxruntime", 1, "input_ids=1x128"] == pytest.approx(0.5)
    assert speedup["canao-fast", 2, "input_ids=1x128"] == pytest.approx(2.0)
    assert np.isnan(speedup["canao-fast", 1, "input_ids=1x64"])


def test_write_outputs_csv_and_png(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib", reason="matplotlib not installed (canao[baselines])")
    df = pd.DataFrame([_row(s, t, 0.01 * (i + 1)) for i, s in enumerate(SYSTEMS) for t in (1, 2)])
    csv_path, png_path = write_outputs(df, tmp_path / "out")
    table = pd.read_csv(csv_path)
    assert len(table) == len(df) and SPEEDUP_COLUMN in table
    assert table.loc[table["system"] == "litert-fp32", SPEEDUP_COLUMN].tolist() == [1.0, 1.0]
    data = png_path.read_bytes()
    assert data.startswith(b"\x89PNG") and len(data) > 10_000


def test_write_outputs_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(BaselineUnavailable, match=r"matplotlib.*canao\[baselines\]"):
        write_outputs(pd.DataFrame([_row("litert-fp32", 1, 0.01)]), tmp_path)


@pytest.mark.slow
def test_compare_all_systems(tiny: LoadedModel) -> None:
    """End to end, converting afresh into this test's own cache folder."""
    pytest.importorskip("onnxruntime", reason="onnxruntime not installed (canao[baselines])")
    pytest.importorskip("ai_edge_litert", reason="ai-edge-litert not installed (canao[baselines])")
    try:
        df = compare(tiny, [1, 2], seq=SEQ, protocol=Protocol(warmup=1, repeats=4), rounds=2)
    except BaselineUnavailable as err:
        pytest.skip(f"LiteRT converter venv cannot be built: {err}")
    assert list(df.columns) == [*COLUMNS, SPEEDUP_COLUMN]
    pairs = list(df[["system", "threads"]].itertuples(index=False, name=None))
    assert pairs == [(s, t) for t in (1, 2) for s in SYSTEMS]
    assert (df["median_ms"] > 0).all() and (df["min_ms"] <= df["median_ms"]).all()
    exact = df[~df["system"].isin(QUANTIZED_SYSTEMS)]
    assert (exact["max_abs_diff"] <= exact["tolerance"]).all()
    reference = df[df["system"] == "litert-fp32"]
    assert reference[SPEEDUP_COLUMN].tolist() == [1.0, 1.0]
    assert df["protocol"].unique().tolist() == ["warmup=1,repeats=4,number=1"]
