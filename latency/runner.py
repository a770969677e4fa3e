"""Run and time a compiled library on a device: in this process, or over TVM RPC.

A :class:`DeviceRunner` owns one loaded library on one device and does the
two things canao needs from a device: run once (numerics) and time
(latency protocol). :func:`local_runner` and
:func:`canao.latency.rpc.remote_runner` make one.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from canao.latency.protocol import Protocol

ENTRY = "main"


@dataclass
class DeviceRunner:
    """A Relax VM over one loaded library on one (local or remote) device."""

    vm: Any
    device: Any
    label: str  # "local" or "rpc://host:port[/key]"
    session: Any = None  # the RPC session, kept alive as long as the runner

    def _tensors(self, inputs: dict[str, np.ndarray], names: tuple[str, ...]) -> list[Any]:
        import tvm

        return [tvm.runtime.tensor(np.ascontiguousarray(inputs[n]), self.device) for n in names]

    def bind(self, inputs: dict[str, np.ndarray], names: tuple[str, ...]) -> Callable[[], Any]:
        """A no-argument call of one inference on ``inputs`` (already on the device)."""
        main, args = self.vm[ENTRY], self._tensors(inputs, names)
        return lambda: main(*args)

    def run(self, inputs: dict[str, np.ndarray], names: tuple[str, ...]) -> np.ndarray:
        """One inference; the output copied back to this machine."""
        return self.vm[ENTRY](*self._tensors(inputs, names)).numpy()

    def time(
        self, inputs: dict[str, np.ndarray], names: tuple[str, ...], protocol: Protocol
    ) -> list[float]:
        """Per-repeat seconds, timed on the device itself (no RPC round trip inside).

        ``protocol.warmup`` untimed calls, then ``time_evaluator`` (which adds one
        more untimed call of its own) for ``protocol.repeats`` timed repeats.
        """
        self.vm.set_input(ENTRY, *self._tensors(inputs, names))
        for _ in range(protocol.warmup):
            self.vm.invoke_stateful(ENTRY)
        timer = self.vm.time_evaluator(
            "invoke_stateful", self.device, number=protocol.number, repeat=protocol.repeats
        )
        return [float(s) for s in timer(ENTRY).results]

    def threads(self) -> int:
        """Threads the device's TVM runtime uses."""
        getter = (self.session or _LocalFunctions()).get_function("runtime.NumThreads")
        return int(getter())

    def close(self) -> None:
        """Release the library, the device and the RPC session now.

        A standalone RPC server serves one session at a time, and the session ends
        only when its last remote object is freed. Left to Python, that can wait for
        the cycle collector (a frame kept by a traceback or ``inspect.stack()`` keeps
        the runner), and the next connect to the board then times out.
        """
        self.vm = self.device = self.session = None

    def __enter__(self) -> DeviceRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _LocalFunctions:
    def get_function(self, name: str) -> Any:
        import tvm

        return tvm.get_global_func(name)


def local_runner(library: Path | Any, device_type: str = "cpu") -> DeviceRunner:
    """Load ``library`` (an exported .so path, or an in-memory executable) here."""
    import tvm
    from tvm import relax

    module = tvm.runtime.load_module(str(library)) if isinstance(library, (str, Path)) else library
    device = tvm.device(device_type, 0)
    if not device.exist:
        from canao.errors import DeviceUnreachableError

        raise DeviceUnreachableError(f"no local {device_type} device: cannot run this build here")
    return DeviceRunner(relax.VirtualMachine(module, device), device, "local")


def set_thread_env(threads: int | None) -> dict[str, str]:
    """Environment for a child process whose TVM runtime must use ``threads`` threads.

    TVM reads TVM_NUM_THREADS once, when its thread pool starts; changing it
    later in the same process has no effect (and by default TVM uses half the
    logical cores, i.e. 1 thread on a 2-vCPU machine). So each thread count is
    measured in its own process.
    """
    env = dict(os.environ)
    if threads is not None:
        env["TVM_NUM_THREADS"] = str(threads)
    return env
