"""The int8 peak loop: the instructions it times, how it counts, and refusing what it can't run."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from canao.latency import peak
from canao.latency.peak import (
    PEAK_LOOPS,
    PeakUnavailableError,
    build_peak_library,
    cpu_flags,
    int8_peak,
    peak_loop,
)

needs_compiler = pytest.mark.skipif(
    shutil.which("cc") is None or shutil.which("objdump") is None,
    reason="needs a C compiler and objdump",
)

# What each loop must issue, as objdump prints it, how many per round (one per accumulator),
# and what it must not (another kernel's instruction).
EXPECTED = {
    "avx512-vnni": ("vpdpbusd %zmm15,%zmm14,%zmm", 14, "{vex}"),
    "avx-vnni": ("{vex} vpdpbusd %ymm15,%ymm14,%ymm", 14, "zmm"),
    "avx2-u7": ("vpmaddubsw %ymm15,%ymm14,%ymm", 6, "vpdpbusd"),
    "avx2": ("vpmaddwd %ymm15,%ymm14,%ymm", 6, "vpmaddubsw"),
}
ROUNDS_PER_ITERATION = 4


def _disassembly(library: Path) -> str:
    return subprocess.run(
        ["objdump", "-d", "--no-show-raw-insn", str(library)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout


@needs_compiler
@pytest.mark.parametrize("isa", sorted(PEAK_LOOPS))
def test_every_loop_builds_on_any_x86_host_with_its_instructions(isa: str, tmp_path: Path) -> None:
    asm = _disassembly(build_peak_library(isa, tmp_path))
    wanted, per_round, unwanted = EXPECTED[isa]
    loop = asm.split("<canao_int8_peak>:", 1)[1].split("jne", 1)[0]
    assert loop.count(wanted) == per_round * ROUNDS_PER_ITERATION
    assert unwanted not in loop
    assert not re.search(r"\(%r[a-z0-9]+\)", loop)  # registers only: no loads


def test_ops_per_round_are_the_vector_bytes_multiplied() -> None:
    """2 ops per multiply-add; a 512-bit vpdpbusd multiplies 64 byte pairs, a 256-bit
    vpmaddubsw 32, a 256-bit vpmaddwd 16 int16 pairs."""
    assert peak_loop("avx512-vnni").ops_per_round == 14 * 64 * 2
    assert peak_loop("avx-vnni").ops_per_round == 14 * 32 * 2
    assert peak_loop("avx2-u7").ops_per_round == 6 * 32 * 2
    assert peak_loop("avx2").ops_per_round == 6 * 16 * 2


def test_an_isa_without_a_loop_is_one_clear_error() -> None:
    with pytest.raises(PeakUnavailableError, match="no assembly peak loop for int8 ISA 'neon-dot'"):
        peak_loop("neon-dot")


def test_a_cpu_without_the_instructions_is_refused_not_crashed(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Running vpdpbusd on a CPU without it would kill the process (SIGILL)."""
    monkeypatch.setattr(peak, "cpu_flags", lambda: frozenset({"avx2"}))
    monkeypatch.setattr(peak.platform, "machine", lambda: "x86_64")
    with pytest.raises(PeakUnavailableError, match="lacks 'avx512_vnni'"):
        int8_peak("avx512-vnni")


def test_a_missing_compiler_is_named(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(peak.shutil, "which", lambda _name: None)
    with pytest.raises(PeakUnavailableError, match="no C compiler"):
        build_peak_library("avx2", tmp_path)


@needs_compiler
def test_the_hosts_loop_runs_and_counts_its_work() -> None:
    runnable = [isa for isa, loop in PEAK_LOOPS.items() if loop.cpu_flag in cpu_flags()]
    if not runnable:
        pytest.skip("this CPU runs none of the x86 int8 peak loops")
    isa = runnable[-1]  # the cheapest: avx2 where the host has it
    call, ops = int8_peak(isa, ops_per_call=1 << 20)
    per_iteration = peak_loop(isa).ops_per_round * ROUNDS_PER_ITERATION
    assert ops == (1 << 20) // per_iteration * per_iteration
    call()
    call()  # the library stays loaded between calls
