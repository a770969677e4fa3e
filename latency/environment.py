"""What a measurement depends on besides the model: machine, threads, versions.

Every Measurement carries this record, so a number can be reproduced (or
explained) later; peers that dropped it got unreproducible results.
"""

from __future__ import annotations

import hashlib
import os
import platform
from functools import cache
from importlib import metadata
from pathlib import Path

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


@cache
def host_identity() -> str:
    """This machine as its timings depend on it: CPU name, family/model/stepping, cores.

    The marketing name alone is not enough ("AMD EPYC" covers several generations).
    """
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                name, _, value = line.partition(":")
                name = name.strip().lower()
                if name in ("cpu family", "model", "stepping", "cpu part") and name not in fields:
                    fields[name] = value.strip()
    except OSError:
        pass
    detail = ".".join(fields.get(k, "") for k in ("cpu family", "model", "stepping", "cpu part"))
    return f"{cpu_model()}|{detail}|{os.cpu_count()}"


@cache
def code_fingerprint() -> str:
    """TVM's version and canao's code generation sources: what makes the kernels what they are.

    A latency measured with other kernels (an older canao, another TVM) is stale.
    """
    root = Path(__file__).resolve().parent.parent  # the folder holding compiler/, fusion/
    digest = hashlib.sha256(versions().get("apache-tvm", "").encode())
    for folder in ("compiler", "fusion"):
        for source in sorted((root / folder).rglob("*.py")):
            digest.update(source.relative_to(root).as_posix().encode())
            digest.update(source.read_bytes())
    return digest.hexdigest()[:12]
