"""Named compilation targets.

A target says how to generate code (a TVM ``Target``), how to link the
deployable library (the host C compiler, or a cross compiler), and what
device runs it. Add a target by adding one entry to :data:`TARGETS`
(see the README, "Adding a target").
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from canao.errors import ToolchainError, UnknownTargetError

# What a failed probe link says, and the Debian package that provides what is missing.
# Order matters: the first match names the package.
_LINK_FAILURE_PACKAGES: tuple[tuple[str, str], ...] = (
    ("crti.o", "libc6-dev-arm64-cross"),
    ("crtn.o", "libc6-dev-arm64-cross"),
    ("cannot find -lc", "libc6-dev-arm64-cross"),
    ("stdio.h", "libc6-dev-arm64-cross"),
    ("as: not found", "binutils-aarch64-linux-gnu"),
    ("cannot execute 'as'", "binutils-aarch64-linux-gnu"),
    ("cannot execute 'ld'", "binutils-aarch64-linux-gnu"),
    ("cannot execute: ld", "binutils-aarch64-linux-gnu"),
)


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    device_type: str  # "cpu" or "cuda": the TVM device that runs the library
    make_tvm_target: Callable[[], object]  # builds a tvm.target.Target (lazily: TVM is heavy)
    cross_compiler: str | None = None  # C compiler that links the .so; None = host compiler
    triple: str = ""  # machine the library runs on, recorded in the manifest
    compiler_package: str = ""  # Debian package that provides ``cross_compiler``

    def tvm_target(self) -> object:
        return self.make_tvm_target()

    @property
    def is_cross(self) -> bool:
        """Built here for another machine (arm64): it runs there, over RPC, not here."""
        return self.cross_compiler is not None

    def linker(self) -> Callable[..., None] | None:
        """The ``fcompile`` for ``export_library``; None means TVM's host default."""
        if self.cross_compiler is None:
            return None
        self.check_toolchain()
        from tvm.support import cc

        return cc.cross_compiler(self.cross_compiler)

    def check_toolchain(self) -> None:
        """Fail in one line, before any build, if this target's library cannot be linked here.

        A cross compiler on PATH is not enough: without its C library (Debian's
        ``libc6-dev-arm64-cross``) every link fails with ``cannot find crti.o`` after the
        whole model has been compiled. So link a trivial shared library, once per process.
        """
        if self.cross_compiler is None:
            return
        problem = _probe_link(self.cross_compiler, self.compiler_package)
        if problem is not None:
            raise ToolchainError(f"target {self.name!r} cannot link here: {problem}")


@functools.cache
def _probe_link(compiler: str, compiler_package: str) -> str | None:
    """Why ``compiler`` cannot link a shared library, or None if it can (cached)."""
    package_hint = f" (Debian: apt-get install {compiler_package})" if compiler_package else ""
    if shutil.which(compiler) is None:
        return f"the cross compiler {compiler!r} is not on PATH{package_hint}"
    with tempfile.TemporaryDirectory(prefix="canao-linkprobe-") as tmp:
        source = Path(tmp) / "probe.c"
        source.write_text("int canao_probe(int x) { return x + 1; }\n", encoding="utf-8")
        command = [compiler, "-shared", "-fPIC", "-o", str(Path(tmp) / "probe.so"), str(source)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, timeout=60)
        except (OSError, subprocess.TimeoutExpired) as error:
            return f"{compiler!r} did not run: {error}"
    if result.returncode == 0:
        return None
    output = result.stderr + result.stdout
    for clue, package in _LINK_FAILURE_PACKAGES:
        if clue in output:
            return (
                f"{compiler!r} cannot link a shared library ({_first_error_line(output)}); "
                f"install {package} (Debian: apt-get install {package})"
            )
    return f"{compiler!r} cannot link a shared library: {_first_error_line(output)}"


def _first_error_line(output: str) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower() or "cannot" in line.lower()]
    return (errors or lines or ["no output"])[0]


def _host_cpu_target() -> object:
    import tvm

    # mcpu="native" silently becomes "generic" in 0.27: ask LLVM for the host CPU by name.
    return tvm.target.Target(
        {
            "kind": "llvm",
            "mcpu": tvm.target.codegen.llvm_get_system_cpu(),
            "num-cores": os.cpu_count() or 1,
        }
    )


def _aarch64_target(*features: str) -> Callable[[], object]:
    def make() -> object:
        import tvm

        mattr = ["+neon", *(f"+{feature}" for feature in features)]
        return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": mattr})

    return make


def _cuda_target() -> object:
    import tvm

    # With a GPU present, compile for its compute capability; else a common default (sm_80).
    device = tvm.cuda(0)
    arch = f"sm_{device.compute_version.replace('.', '')}" if device.exist else "sm_80"
    return tvm.target.Target({"kind": "cuda", "arch": arch}, host=_host_cpu_target())


TARGETS: dict[str, TargetSpec] = {
    "x86": TargetSpec(
        "x86",
        "this host's x86-64 CPU (LLVM, host CPU features, all cores)",
        "cpu",
        _host_cpu_target,
        triple="x86_64-linux-gnu",
    ),
    "arm64": TargetSpec(
        "arm64",
        "64-bit ARM Linux with NEON (LLVM aarch64, cross-linked with aarch64-linux-gnu-gcc)",
        "cpu",
        _aarch64_target(),
        cross_compiler="aarch64-linux-gnu-gcc",
        triple="aarch64-linux-gnu",
        compiler_package="gcc-aarch64-linux-gnu",
    ),
    # ARMv8.2+ cores (Cortex-A55/A76 and later: phones since 2018, Raspberry Pi 5) have the
    # dot-product instructions: int8 builds run on sdot instead of widening multiplies.
    "arm64-dotprod": TargetSpec(
        "arm64-dotprod",
        "64-bit ARM Linux with NEON and dotprod (ARMv8.2+: int8 on sdot)",
        "cpu",
        _aarch64_target("dotprod"),
        cross_compiler="aarch64-linux-gnu-gcc",
        triple="aarch64-linux-gnu",
        compiler_package="gcc-aarch64-linux-gnu",
    ),
    # ARMv8.6 cores (Cortex-A510/A710/X2 and later, Neoverse V1/N2: Graviton 3) add i8mm:
    # usdot multiplies uint8 activations by int8 weights directly.
    "arm64-i8mm": TargetSpec(
        "arm64-i8mm",
        "64-bit ARM Linux with NEON, dotprod and i8mm (ARMv8.6+: int8 on usdot)",
        "cpu",
        _aarch64_target("dotprod", "i8mm"),
        cross_compiler="aarch64-linux-gnu-gcc",
        triple="aarch64-linux-gnu",
        compiler_package="gcc-aarch64-linux-gnu",
    ),
    "cuda": TargetSpec(
        "cuda",
        "NVIDIA GPU (CUDA, TVM's default GPU schedules)",
        "cuda",
        _cuda_target,
        triple="x86_64-linux-gnu+cuda",
    ),
}


def get_target(name: str) -> TargetSpec:
    """The target called ``name``; an unknown name lists the valid ones."""
    try:
        return TARGETS[name]
    except KeyError:
        raise UnknownTargetError(
            f"unknown target {name!r}; valid targets: {', '.join(TARGETS)}"
        ) from None
