"""Remote measurement over TVM RPC, the way a user measures on a phone or a board.

``--rpc host:port`` names an RPC server directly; with ``--key name`` it
names a tracker and the device key registered there. Every network step is
bounded: an unreachable tracker, server or key gives one
:class:`~canao.errors.DeviceUnreachableError` after ``timeout_s``.

:class:`LocalRPC` starts a tracker and a server on 127.0.0.1 (loopback tests,
or serving this machine to a search running elsewhere).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from canao.errors import DeviceUnreachableError
from canao.latency.runner import DeviceRunner

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 20.0


@dataclass(frozen=True)
class RPCAddress:
    host: str
    port: int
    key: str | None = None  # set: (host, port) is a tracker and key the device; else a server

    @classmethod
    def parse(cls, address: str, key: str | None = None) -> RPCAddress:
        host, sep, port = address.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise DeviceUnreachableError(f"malformed RPC address {address!r}: expected host:port")
        return cls(host, int(port), key or None)

    @property
    def label(self) -> str:
        return f"rpc://{self.host}:{self.port}" + (f"/{self.key}" if self.key else "")


def _bounded(fn: Callable[[], T], timeout_s: float, what: str) -> T:
    """Run ``fn`` in a helper thread; give up after ``timeout_s`` with a clear error.

    TVM's RPC client retries or blocks without a deadline in several places
    (a tracker request for a busy key waits forever), hence the thread.
    """
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = fn()
        except BaseException as err:
            box["error"] = err

    worker = threading.Thread(target=target, daemon=True)
    worker.start()
    worker.join(timeout_s)
    if worker.is_alive():
        raise DeviceUnreachableError(f"{what}: no answer within {timeout_s:.0f} s")
    if "error" in box:
        raise DeviceUnreachableError(f"{what}: {box['error']}") from None
    return box["value"]


def _check_port(host: str, port: int, timeout_s: float, role: str) -> None:
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        raise DeviceUnreachableError(
            f"cannot reach the RPC {role} at {host}:{port} ({err.strerror or err}); "
            f"is it running (python -m tvm.exec.rpc_{role} --port {port})?"
        ) from None


def connect(address: RPCAddress, timeout_s: float = DEFAULT_TIMEOUT_S) -> Any:
    """An RPC session with the device at ``address``."""
    from tvm import rpc

    if address.key is None:
        # A standalone server (started without --tracker and without --key).
        _check_port(address.host, address.port, timeout_s, "server")
        return _bounded(
            lambda: rpc.connect(address.host, address.port),
            timeout_s,
            f"RPC server {address.host}:{address.port}",
        )
    _check_port(address.host, address.port, timeout_s, "tracker")
    tracker = _bounded(
        lambda: rpc.connect_tracker(address.host, address.port),
        timeout_s,
        f"RPC tracker {address.host}:{address.port}",
    )
    keys = registered_keys(tracker)
    if address.key not in keys:
        raise DeviceUnreachableError(
            f"no device with key {address.key!r} at tracker {address.host}:{address.port}; "
            f"registered keys: {', '.join(sorted(keys)) or 'none'}"
        )
    return _bounded(
        lambda: tracker.request(address.key, max_retry=1),
        timeout_s,
        f"device {address.key!r} via tracker {address.host}:{address.port} (busy or gone)",
    )


def registered_keys(tracker: Any) -> set[str]:
    """Device keys with at least one server registered at ``tracker``."""
    summary = tracker.summary()
    return {
        str(info["key"]).split(":", 1)[-1]
        for info in summary.get("server_info", [])
        if "key" in info
    }


def remote_runner(
    library: Path,
    address: RPCAddress,
    device_type: str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> DeviceRunner:
    """Upload ``library`` to the device at ``address``, load it, wrap it in a VM."""
    from tvm import relax

    session = connect(address, timeout_s)
    session.upload(str(library))
    module = session.load_module(Path(library).name)
    device = session.device(device_type, 0)
    return DeviceRunner(relax.VirtualMachine(module, device), device, address.label, session)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class LocalRPC:
    """TVM RPC on 127.0.0.1: a tracker plus one server registered under ``key``, or
    (``use_tracker=False``) one standalone server. Each runs in its own process group.

    Server workers outlive a killed parent and keep their ports, so the whole
    process group is killed on exit.
    """

    def __init__(
        self,
        key: str = "local",
        threads: int | None = None,
        python: str | None = None,
        use_tracker: bool = True,
    ) -> None:
        self.key = key
        self.threads = threads
        self.python = python or sys.executable
        self.use_tracker = use_tracker
        self.tracker_port = free_port()
        self.server_port = free_port()
        self._procs: list[subprocess.Popen[bytes]] = []
        self._logs: list[Path] = []

    @property
    def tracker(self) -> RPCAddress:
        return RPCAddress("127.0.0.1", self.tracker_port, self.key)

    @property
    def server(self) -> RPCAddress:
        return RPCAddress("127.0.0.1", self.server_port)

    def _spawn(self, args: list[str], role: str) -> subprocess.Popen[bytes]:
        env = dict(os.environ)
        if self.threads:
            env["TVM_NUM_THREADS"] = str(self.threads)
        log = Path(tempfile.mkstemp(prefix=f"canao-rpc-{role}-", suffix=".log")[1])
        self._logs.append(log)
        with log.open("wb") as sink:
            proc = subprocess.Popen(
                [self.python, *args],
                env=env,
                stdout=sink,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self._procs.append(proc)
        return proc

    def _fail(self, err: DeviceUnreachableError) -> DeviceUnreachableError:
        tails = [
            "\n".join(log.read_text(errors="replace").strip().splitlines()[-3:])
            for log in self._logs
        ]
        self.__exit__()
        return DeviceUnreachableError(f"{err}: {' | '.join(t for t in tails if t)}")

    def __enter__(self) -> LocalRPC:
        server_args = [
            "-m",
            "tvm.exec.rpc_server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.server_port),
            "--port-end",
            str(self.server_port + 1),
            "--silent",
        ]
        try:
            if not self.use_tracker:
                _wait_for_port(self.server_port, 30, "server", self._spawn(server_args, "server"))
                return self
            tracker = self._spawn(
                [
                    "-m",
                    "tvm.exec.rpc_tracker",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.tracker_port),
                    "--port-end",
                    str(self.tracker_port + 1),
                    "--silent",
                ],
                "tracker",
            )
            _wait_for_port(self.tracker_port, 30, "tracker", tracker)
            # No probe of the server's port: a stray connection makes it drop out of
            # the tracker and re-register. Registration is the readiness signal.
            server = self._spawn(
                [*server_args, "--key", self.key, "--tracker", f"127.0.0.1:{self.tracker_port}"],
                "server",
            )
            self._wait_registered(30, server)
        except DeviceUnreachableError as err:
            raise self._fail(err) from None
        return self

    def _wait_registered(self, timeout_s: float, server: subprocess.Popen[bytes]) -> None:
        from tvm import rpc

        deadline = time.monotonic() + timeout_s
        tracker = rpc.connect_tracker("127.0.0.1", self.tracker_port)
        while self.key not in registered_keys(tracker):
            if server.poll() is not None:
                raise DeviceUnreachableError(f"local RPC server exited ({server.returncode})")
            if time.monotonic() > deadline:
                raise DeviceUnreachableError(f"server {self.key!r} never registered")
            time.sleep(0.2)

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self._procs):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        self._procs.clear()
        for log in self._logs:
            log.unlink(missing_ok=True)
        self._logs.clear()


def _wait_for_port(
    port: int, timeout_s: float, role: str, proc: subprocess.Popen[bytes] | None = None
) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise DeviceUnreachableError(f"local RPC {role} exited with code {proc.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return
        except OSError:
            time.sleep(0.1)
    raise DeviceUnreachableError(f"local RPC {role} did not start on port {port}")
