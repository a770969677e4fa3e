"""What a measurement depends on besides the model: machine, threads, versions.

Every Measurement carries this record, so a number can be reproduced (or
explained) later; peers that dropped it got unreproducible results.
"""

from __future__ import annotations

import os
import platform
from functools import cache
from importlib import metadata

# Packages whose version changes generated code or timings.
_TRACKED_PACKAGES = ("apache-tvm", "apache-tvm-ffi", "torch", "transformers", "numpy", "canao")


@cache
def cpu_model() -> str:
    """The host CPU's marketing name, or the architecture where /proc has none."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


@cache
def versions() -> dict[str, str]:
    """Installed versions of the packages that shape a result, plus Python's."""
    found = {"python": platform.python_version()}
    for name in _TRACKED_PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def default_threads() -> int:
    """Threads TVM uses when nothing is set: TVM_NUM_THREADS, else all cores."""
    configured = os.environ.get("TVM_NUM_THREADS")
    if configured and configured.isdigit() and int(configured) > 0:
        return int(configured)
    return os.cpu_count() or 1
