"""Remote measurement over TVM RPC on loopback, and bounded failures."""

from __future__ import annotations

import gc
import time

import numpy as np
import pytest

from canao.compiler.importer import INPUT_NAMES, example_inputs, torch_reference
from canao.errors import DeviceUnreachableError
from canao.latency.measure import measure
from canao.latency.protocol import Protocol
from canao.latency.rpc import LocalRPC, RPCAddress, connect, free_port, remote_runner
from tests.test_latency import tiny_workload  # noqa: F401  (shared module fixture)


def test_loopback_tracker_and_direct_server(tiny_workload) -> None:  # noqa: F811
    workload, model = tiny_workload
    inputs = example_inputs(1000, 1, 16)
    reference = torch_reference(model.module, inputs)
    protocol = Protocol(warmup=1, repeats=5)
    with LocalRPC(key="loopback", threads=1) as cluster:
        via_tracker = measure(workload, inputs, protocol=protocol, rpc=cluster.tracker)
        m = via_tracker.measurement
        assert m.device.endswith("/loopback") and len(m.repeats_ms) == 5 and m.median_ms > 0
        np.testing.assert_allclose(via_tracker.output, reference, atol=1e-4)
        local = measure(workload, inputs, protocol=protocol, threads=1)
        # Loopback timings are the device's own: same order as a local run.
        assert 0.2 < m.median_ms / local.measurement.median_ms < 5
        with pytest.raises(DeviceUnreachableError, match=r"no device with key 'phone'.*loopback"):
            connect(RPCAddress("127.0.0.1", cluster.tracker_port, "phone"), timeout_s=5)


def test_direct_server(tiny_workload) -> None:  # noqa: F811
    workload, _ = tiny_workload
    inputs = example_inputs(1000, 1, 16)
    with LocalRPC(key="direct", use_tracker=False) as cluster:
        run = measure(workload, inputs, protocol=Protocol(warmup=0, repeats=2), rpc=cluster.server)
        assert run.measurement.device == f"rpc://127.0.0.1:{cluster.server_port}"


def test_closed_runner_frees_the_board_for_the_next_session(tiny_workload) -> None:  # noqa: F811
    """A standalone server serves one session at a time: the runner must end its session.

    A reference cycle (as a stored traceback or ``inspect.stack()`` makes) keeps the
    runner itself alive with the collector off; the next connect must still get in.
    """
    workload, _ = tiny_workload
    inputs = example_inputs(1000, 1, 16)
    with LocalRPC(key="single", use_tracker=False) as cluster:
        gc.disable()
        try:
            with remote_runner(workload.library, cluster.server, timeout_s=10) as runner:
                kept: list[object] = [runner]
                kept.append(kept)
                assert runner.run(inputs, INPUT_NAMES).shape == (1, 16, 64)
            assert connect(cluster.server, timeout_s=10) is not None
        finally:
            gc.enable()


def test_unreachable_device_fails_fast() -> None:
    port = free_port()  # nothing listens here
    start = time.monotonic()
    with pytest.raises(
        DeviceUnreachableError, match=f"cannot reach the RPC server at 127.0.0.1:{port}"
    ):
        connect(RPCAddress("127.0.0.1", port), timeout_s=3)
    with pytest.raises(DeviceUnreachableError, match="RPC tracker"):
        connect(RPCAddress("127.0.0.1", port, "phone"), timeout_s=3)
    assert time.monotonic() - start < 10


def test_silent_server_times_out() -> None:
    """A port that accepts but never speaks RPC: bounded wait, then a clear error."""
    import socket

    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(DeviceUnreachableError, match="no answer within 2 s"):
            connect(RPCAddress("127.0.0.1", port), timeout_s=2)
        assert time.monotonic() - start < 6


def test_malformed_address() -> None:
    with pytest.raises(DeviceUnreachableError, match="expected host:port"):
        RPCAddress.parse("localhost")
