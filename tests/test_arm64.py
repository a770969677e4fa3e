"""arm64: cross-compiled BERT builds, run for real on an emulated aarch64 board over RPC."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from canao import workflow
from canao.compiler.build import compile_model, export_artifact
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs
from canao.compiler.models import load_model
from canao.latency.measure import Workload, measure
from canao.latency.protocol import Protocol
from canao.latency.rpc import RPCAddress
from tests.conftest import write_config

EM_AARCH64 = 183  # ELF e_machine of AArch64

pytestmark = pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="aarch64-linux-gnu-gcc not installed (apt-get install gcc-aarch64-linux-gnu)",
)


def _require_emulation() -> None:
    """Skip, saying why, where qemu-aarch64 cannot run the emulated board."""
    from canao.latency.arm_emulation import qemu_available

    reason = qemu_available()
    if reason is not None:
        pytest.skip(f"no ARM emulation here: {reason}")


def elf_machine(path: Path) -> int:
    header = path.read_bytes()[:20]
    assert header[:4] == b"\x7fELF", f"{path} is not an ELF file"
    return int.from_bytes(header[18:20], "little")


def test_cross_compile_produces_an_aarch64_library(tmp_path: Path, tiny_config: Path) -> None:
    compiled = compile_model(load_model(tiny_config), "arm64", "fast", InputSpec(1, 16))
    folder = export_artifact(compiled, tmp_path / "arm")
    assert elf_machine(folder / "model.so") == EM_AARCH64
    manifest = (folder / "manifest.json").read_text()
    assert "aarch64-linux-gnu" in manifest


@pytest.mark.slow
def test_runs_on_emulated_arm_board_with_matching_outputs(tmp_path: Path) -> None:
    from canao.latency.arm_emulation import EmulatedRPCServer

    _require_emulation()
    config = write_config(
        tmp_path, num_hidden_layers=1, hidden_size=32, intermediate_size=64, vocab_size=200
    )
    with EmulatedRPCServer() as board:
        address = RPCAddress(board.host, board.port)
        # The whole canao path: compile for arm64, upload, run on aarch64, compare.
        compiled = workflow.compile_and_verify(
            str(config), "arm64", "fast", seq=8, rpc=address, rpc_timeout_s=120
        )
        assert compiled.numerics is not None
        assert compiled.numerics["device"] == address.label
        assert compiled.numerics["max_abs_diff"] < 1e-4  # type: ignore[operator]
        # canao's own attention kernel (NEON, 4 lanes) is part of what ran there.
        kernels = [str(gv.name_hint) for gv in compiled.lowered.functions]
        assert any(name.startswith("canao_attention") for name in kernels), kernels
        # And the latency protocol over RPC (emulated timings: correctness, not speed).
        folder = export_artifact(compiled, tmp_path / "arm")
        workload = Workload(
            folder / "model.so",
            "tiny",
            compiled.model.fingerprint,
            "arm64",
            "fast",
            InputSpec(1, 8).shapes(),
            INPUT_NAMES,
        )
        run = measure(
            workload,
            example_inputs(200, 1, 8),
            protocol=Protocol(warmup=0, repeats=2),
            rpc=address,
            rpc_timeout_s=120,
        )
        assert run.measurement.device == address.label and len(run.measurement.repeats_ms) == 2
        assert run.output is not None and run.output.shape == (1, 8, 32)


def test_cross_compiled_from_the_kernel_cache(tmp_path: Path, tiny_config: Path) -> None:
    from canao.compiler.build import export_library
    from canao.compiler.kernel_cache import KernelCache
    from canao.compiler.targets import get_target

    cache = KernelCache(str(get_target("arm64").tvm_target()))
    for name in ("first", "again"):
        compiled = compile_model(
            load_model(tiny_config), "arm64", "fast", InputSpec(1, 16), kernel_cache=cache
        )
        library = export_library(compiled, tmp_path / name / "model.so")
        assert elf_machine(library) == EM_AARCH64
    assert compiled.cached is not None and compiled.cached.stats.compiled == 0


@pytest.mark.slow
def test_search_candidates_linked_from_cached_kernels_run_on_the_emulated_board() -> None:
    from transformers import BertConfig

    from canao.latency.arm_emulation import EmulatedRPCServer
    from canao.nas.latency import LatencyEvaluator
    from canao.nas.space import ArchConfig

    _require_emulation()
    base = BertConfig(vocab_size=200, max_position_embeddings=32)
    with EmulatedRPCServer() as board:
        evaluator = LatencyEvaluator(
            base,
            target="arm64",
            seq=8,
            protocol=Protocol(warmup=0, repeats=2),
            rpc=RPCAddress(board.host, board.port),
            rpc_timeout_s=120,
        )
        evaluator(ArchConfig(32, (2, 1), (64, 32), 16))
        linked = evaluator(ArchConfig(32, (2,), (64,), 16))  # every kernel from the first
    assert linked.kernels_compiled == 0
    assert linked.max_abs_diff is not None and linked.max_abs_diff < 1e-4


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "isa", "stored"),
    [
        ("arm64-i8mm", "neon_i8mm", "u8"),
        ("arm64-dotprod", "neon_dot", "s8"),
        ("arm64", "neon", "u8"),
    ],
)
def test_int8_build_runs_on_the_emulated_board_and_matches_its_reference(
    tmp_path: Path, target: str, isa: str, stored: str
) -> None:
    """usdot (i8mm), sdot (dotprod) and widening-multiply (NEON) int8 builds, run as aarch64
    code (qemu's default CPU has i8mm and dotprod)."""
    from canao.latency.arm_emulation import EmulatedRPCServer

    _require_emulation()
    config = write_config(
        tmp_path, num_hidden_layers=1, hidden_size=64, intermediate_size=128, vocab_size=200
    )
    with EmulatedRPCServer() as board:
        address = RPCAddress(board.host, board.port)
        compiled = workflow.compile_and_verify(
            str(config), target, "fast-int8", seq=8, rpc=address, rpc_timeout_s=180
        )
    numerics = compiled.numerics
    assert numerics is not None and numerics["device"] == address.label
    assert numerics["max_abs_diff"] <= numerics["tolerance"]  # type: ignore[operator]
    assert "quantized" in str(numerics["reference"])
    kernels = [str(gv.name_hint) for gv in compiled.lowered.functions]
    assert any(name.startswith(f"canao_dense_int8_{isa}_") for name in kernels), kernels
    assert any(name.startswith(f"canao_quantize_{stored}") for name in kernels), kernels
