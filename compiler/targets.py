"""Named compilation targets.

A target says how to generate code (a TVM ``Target``), how to link the
deployable library (the host C compiler, or a cross compiler), and what
device runs it. Add a target by adding one entry to :data:`TARGETS`
(see the README, "Adding a target").
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from canao.errors import UnknownTargetError


@dataclass(frozen=True)
class TargetSpec:
    name: str
    description: str
    device_type: str  # "cpu" or "cuda": the TVM device that runs the library
    make_tvm_target: Callable[[], object]  # builds a tvm.target.Target (lazily: TVM is heavy)
    cross_compiler: str | None = None  # C compiler that links the .so; None = host compiler
    triple: str = ""  # machine the library runs on, recorded in the manifest

    def tvm_target(self) -> object:
        return self.make_tvm_target()

    def linker(self) -> Callable[..., None] | None:
        """The ``fcompile`` for ``export_library``; None means TVM's host default."""
        if self.cross_compiler is None:
            return None
        if shutil.which(self.cross_compiler) is None:
            raise UnknownTargetError(
                f"target {self.name!r} needs the cross compiler {self.cross_compiler!r}, "
                "which is not on PATH (Debian: apt-get install gcc-aarch64-linux-gnu)"
            )
        from tvm.support import cc

        return cc.cross_compiler(self.cross_compiler)


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


def _aarch64_target() -> object:
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})


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
        _aarch64_target,
        cross_compiler="aarch64-linux-gnu-gcc",
        triple="aarch64-linux-gnu",
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
