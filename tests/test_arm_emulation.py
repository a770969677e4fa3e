"""Tests for the emulated aarch64 TVM RPC board (canao.latency.arm_emulation).

The slow tests cross-compile small Relax modules for aarch64, run them through TVM RPC
on CPython running under qemu-aarch64-static, and compare with a host reference. They
skip only when qemu or the aarch64 cross compiler is not installed.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from canao.latency import arm_emulation
from canao.latency.arm_emulation import (
    EmulatedRPCServer,
    EmulationUnavailable,
    default_root,
    ensure_arm64_root,
    qemu_available,
)

CROSS_CC = "aarch64-linux-gnu-gcc"
EM_AARCH64 = 183  # ELF e_machine of AArch64


# ---------------------------------------------------------------------------
# Fast tests: no qemu needed
# ---------------------------------------------------------------------------


@pytest.fixture
def no_qemu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend qemu-aarch64-static is not installed."""
    real_which = shutil.which

    def which(cmd: str, *args: object, **kwargs: object) -> str | None:
        if os.path.basename(cmd) == arm_emulation.QEMU:
            return None
        return real_which(cmd, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(shutil, "which", which)


def test_missing_qemu_is_reported_clearly(no_qemu: None, tmp_path: Path) -> None:
    reason = qemu_available()
    assert reason is not None
    assert "qemu-aarch64-static not found" in reason
    assert "apt-get install qemu-user-static" in reason

    root = tmp_path / "root"
    with pytest.raises(EmulationUnavailable) as info:
        ensure_arm64_root(root)
    assert str(info.value) == reason
    assert not root.exists(), "nothing may be built without qemu"

    with pytest.raises(EmulationUnavailable, match="qemu-aarch64-static not found"):
        EmulatedRPCServer(root=root).__enter__()


def test_default_root_follows_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("CANAO_ARM64_ROOT", str(tmp_path / "explicit"))
    assert default_root() == tmp_path / "explicit"
    monkeypatch.delenv("CANAO_ARM64_ROOT")
    monkeypatch.setenv("CANAO_CACHE_DIR", str(tmp_path))
    assert default_root() == tmp_path / "arm64-root"
    monkeypatch.delenv("CANAO_CACHE_DIR")
    assert default_root() == Path.home() / ".cache" / "canao" / "arm64-root"


def test_refuses_to_delete_foreign_directory(tmp_path: Path) -> None:
    reason = qemu_available()
    if reason is not None:
        pytest.skip(f"ARM emulation unavailable: {reason}")
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(EmulationUnavailable, match="not a canao arm64 root"):
        ensure_arm64_root(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


# ---------------------------------------------------------------------------
# Slow tests: real emulation
# ---------------------------------------------------------------------------


def _require_toolchain() -> None:
    reason = qemu_available()
    if reason is not None:
        pytest.skip(f"ARM emulation unavailable: {reason}")
    if shutil.which(CROSS_CC) is None:
        pytest.skip(f"{CROSS_CC} not found: apt-get install gcc-aarch64-linux-gnu")


@pytest.fixture(scope="module")
def arm_server() -> Iterator[EmulatedRPCServer]:
    _require_toolchain()
    t0 = time.monotonic()
    ensure_arm64_root()
    t1 = time.monotonic()
    ensure_arm64_root()  # cached: must be cheap
    t2 = time.monotonic()
    with EmulatedRPCServer() as server:
        t3 = time.monotonic()
        print(
            f"\narm64 root {t1 - t0:.1f} s (cached {t2 - t1:.2f} s), "
            f"server start {t3 - t2:.1f} s, port {server.port}"
        )
        yield server


def _aarch64_target() -> object:
    import tvm

    return tvm.target.Target({"kind": "llvm", "mtriple": "aarch64-linux-gnu", "mattr": ["+neon"]})


def _export_aarch64(mod: object, path: Path) -> Path:
    import tvm
    from tvm.support import cc

    ex = tvm.compile(mod, _aarch64_target())
    ex.export_library(str(path), fcompile=cc.cross_compiler(CROSS_CC))
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", "export_library did not produce an ELF file"
    assert header[4] == 2, "expected a 64-bit ELF"
    assert int.from_bytes(header[18:20], "little") == EM_AARCH64, "not an aarch64 ELF"
    return path


def _run_remote(server: EmulatedRPCServer, lib_path: Path, *inputs: np.ndarray) -> np.ndarray:
    import tvm
    from tvm import relax

    remote = server.connect()
    remote.upload(str(lib_path))
    lib = remote.load_module(lib_path.name)
    dev = remote.cpu()
    vm = relax.VirtualMachine(lib, dev)
    out = vm["main"](*[tvm.runtime.tensor(x, dev) for x in inputs])
    return out.numpy()


@pytest.mark.slow
def test_relax_mlp_runs_on_emulated_arm(arm_server: EmulatedRPCServer, tmp_path: Path) -> None:
    from tvm.script import ir as I
    from tvm.script import relax as R

    @I.ir_module
    class MLP:
        @R.function
        def main(
            x: R.Tensor((4, 16), "float32"),
            w1: R.Tensor((16, 32), "float32"),
            b1: R.Tensor((32,), "float32"),
            w2: R.Tensor((32, 8), "float32"),
        ) -> R.Tensor((4, 8), "float32"):
            with R.dataflow():
                h = R.nn.relu(R.add(R.matmul(x, w1), b1))
                y = R.matmul(h, w2)
                R.output(y)
            return y

    lib_path = _export_aarch64(MLP, tmp_path / "mlp_aarch64.so")
    rng = np.random.default_rng(0)
    x, w1, b1, w2 = (
        rng.standard_normal(shape).astype("float32")
        for shape in [(4, 16), (16, 32), (32,), (32, 8)]
    )
    got = _run_remote(arm_server, lib_path, x, w1, b1, w2)
    want = np.maximum(x @ w1 + b1, 0) @ w2
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_torch_block_runs_on_emulated_arm(arm_server: EmulatedRPCServer, tmp_path: Path) -> None:
    # The project feeds BERT blocks through the torch frontend; this covers the same
    # operators (linear, GELU's erf, layer norm's reductions) on aarch64 code-gen.
    import torch
    from tvm.relax.frontend.torch import from_exported_program

    torch.manual_seed(0)
    block = torch.nn.Sequential(
        torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16), torch.nn.LayerNorm(16)
    ).eval()
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        ep = torch.export.export(block, (x,))
        want = block(x).numpy()
    mod = from_exported_program(ep, keep_params_as_input=False, unwrap_unit_return_tuple=True)

    lib_path = _export_aarch64(mod, tmp_path / "block_aarch64.so")
    got = _run_remote(arm_server, lib_path, x.numpy())
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
