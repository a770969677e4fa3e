"""The measurement protocol, the SQLite cache, and local measurement in a child process."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from canao.compiler.build import compile_model, export_library
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs, torch_reference
from canao.compiler.models import load_model
from canao.latency.cache import LatencyCache, default_cache_path, to_dataframe
from canao.latency.measure import MeasurementError, Workload, measure
from canao.latency.protocol import (
    Protocol,
    make_measurement,
    measurement_key,
    summarize,
    time_callable,
)


def test_summary_statistics() -> None:
    stats = summarize([0.004, 0.001, 0.002, 0.003, 0.100])
    assert stats.median_ms == pytest.approx(3.0)
    assert stats.min_ms == pytest.approx(1.0)
    assert stats.iqr_ms == pytest.approx(2.0)  # 4 - 2: the 100 ms outlier does not move it
    with pytest.raises(ValueError, match="no timings"):
        summarize([])


def test_protocol_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="repeats >= 1"):
        Protocol(repeats=0)


def test_time_callable_counts_calls() -> None:
    calls = []
    seconds = time_callable(lambda: calls.append(1), Protocol(warmup=2, repeats=3, number=4))
    assert len(seconds) == 3 and len(calls) == 2 + 3 * 4


def _fake(key: str, median_s: float) -> object:
    return make_measurement(
        [median_s] * 3,
        key=key,
        model="m",
        model_hash="h",
        target="x86",
        pipeline="default",
        shapes="s",
        threads=1,
        protocol=Protocol(repeats=3),
    )


def test_cache_appends_returns_newest_and_persists(tmp_path: Path) -> None:
    path = tmp_path / "lat.sqlite"
    cache = LatencyCache(path)
    cache.put(_fake("a", 0.010))
    cache.put(_fake("a", 0.020))
    cache.put(_fake("b", 0.030))
    cache.close()
    reopened = LatencyCache(path)
    assert len(reopened) == 3
    newest = reopened.get("a")
    assert newest is not None and newest.median_ms == pytest.approx(20.0)
    assert newest.protocol == Protocol(repeats=3) and len(newest.repeats_ms) == 3
    assert reopened.get("missing") is None
    frame = reopened.dataframe()
    assert list(frame["key"]) == ["a", "a", "b"]
    assert {"median_ms", "iqr_ms", "threads", "cpu_model"} <= set(frame.columns)
    assert set(to_dataframe([newest]).columns) >= {"median_ms", "protocol_repeats", "versions"}


def test_default_cache_path_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path))
    assert default_cache_path() == tmp_path / "latency.sqlite"


def test_key_separates_every_dimension() -> None:
    base = measurement_key("h", "x86", "default", "1x128", 1)
    variants = {
        measurement_key("h2", "x86", "default", "1x128", 1),
        measurement_key("h", "arm64", "default", "1x128", 1),
        measurement_key("h", "x86", "fused", "1x128", 1),
        measurement_key("h", "x86", "default", "1x64", 1),
        measurement_key("h", "x86", "default", "1x128", 2),
        measurement_key("h", "x86", "default", "1x128", 1, "rpc://b:1"),
    }
    assert base not in variants and len(variants) == 6


@pytest.fixture(scope="module")
def tiny_workload(tmp_path_factory: pytest.TempPathFactory) -> tuple[Workload, object]:
    from tests.conftest import write_config

    folder = tmp_path_factory.mktemp("tiny")
    model = load_model(write_config(folder))
    compiled = compile_model(model, "x86", "default-fused", InputSpec(1, 16))
    workload = Workload(
        library=export_library(compiled, folder / "tiny.so"),
        model=model.name,
        model_hash=model.fingerprint,
        target="x86",
        pipeline="default-fused",
        shapes=InputSpec(1, 16).shapes(),
        input_names=INPUT_NAMES,
    )
    return workload, model


def test_local_measurement_with_threads_and_cache(tiny_workload, tmp_path: Path) -> None:
    workload, model = tiny_workload
    inputs = example_inputs(1000, 1, 16)
    cache = LatencyCache(tmp_path / "c.sqlite")
    protocol = Protocol(warmup=1, repeats=5)
    first = measure(workload, inputs, protocol=protocol, threads=1, cache=cache)
    m = first.measurement
    assert not first.cached and m.threads == 1 and len(m.repeats_ms) == 5
    assert 0 < m.min_ms <= m.median_ms and m.iqr_ms >= 0
    assert m.device == "local" and m.cpu_model and "apache-tvm" in m.versions
    # The timed library computed the right thing.
    np.testing.assert_allclose(first.output, torch_reference(model.module, inputs), atol=1e-4)
    second = measure(workload, inputs, protocol=protocol, threads=1, cache=cache)
    assert second.cached and second.measurement == m and second.output is None
    two = measure(workload, inputs, protocol=protocol, threads=2, cache=cache)
    assert not two.cached and two.measurement.threads == 2
    assert len(cache) == 2


def test_broken_library_is_a_clear_error(tmp_path: Path) -> None:
    bogus = tmp_path / "broken.so"
    bogus.write_bytes(b"not an ELF")
    workload = Workload(bogus, "m", "h", "x86", "default", "s", INPUT_NAMES)
    with pytest.raises(MeasurementError, match=r"running broken.so locally failed"):
        measure(workload, example_inputs(10, 1, 4), protocol=Protocol(warmup=0, repeats=1))


def test_kernel_profile_accounts_for_every_launch(tiny_workload) -> None:
    from canao.compiler.build import compile_model as build
    from canao.latency.profile import profile_kernels
    from canao.latency.runner import local_runner

    _, model = tiny_workload
    compiled = build(model, "x86", "fast", InputSpec(1, 16))
    frame = profile_kernels(
        local_runner(compiled.executable), example_inputs(1000, 1, 16), INPUT_NAMES, runs=3
    )
    kernels = frame[~frame.kernel.str.startswith("vm.builtin")]
    assert kernels.calls.sum() == compiled.kernels.kernel_launches
    assert (frame.ms > 0).all() and frame.share.sum() == pytest.approx(1.0)
    assert kernels.kernel.str.startswith("canao_dense").any()
