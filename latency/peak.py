"""The host's int8 instruction ceiling, measured: an assembly loop of the dot instructions alone.

A kernel's "fraction of peak" is only honest against a loop that cannot be beaten. A
loop built by TVM and LLVM can be: LLVM hoists operands and folds repeated additions of
a hoisted product into one (on AVX2 such a loop reported 270 GOPS, more than the core
issues), and a loop that keeps its loads is the tile's ceiling, not the core's. So the
peak is hand-written assembly, built with the host's C compiler and called through
ctypes: each round is the instructions the int8 micro-kernel issues per 4 k, on
registers only (no loads, no broadcasts), over enough independent accumulators to hide
their latency, so the core's issue rate is the only limit.

Per ISA (``Int8Isa`` names), one round and its int8 operations (a multiply-add is 2):

- ``avx512-vnni``: 14 x ``vpdpbusd`` zmm (64 multiply-adds each);
- ``avx-vnni``: 14 x ``{vex} vpdpbusd`` ymm (32 each);
- ``avx2-u7``: 6 x (``vpmaddubsw``, ``vpmaddwd`` by ones, ``vpaddd``) (32 each);
- ``avx2``: 6 x (``vpmaddwd``, ``vpaddd``) on int16 (16 each).

Running an instruction the CPU lacks kills the process (SIGILL), so :func:`int8_peak`
checks the CPU's flags first and raises :class:`PeakUnavailableError` instead.
"""

from __future__ import annotations

import ctypes
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from canao.errors import CanaoError

# Independent accumulators per round: enough to cover a dot instruction's latency (4-5
# cycles) at two per cycle, within the 16 vector registers VEX code can name.
_DOT_ACCUMULATORS = 14
_PAIR_ACCUMULATORS = 6  # AVX2: 6 accumulators + 6 products + 3 operands
_ROUNDS_PER_ITERATION = 4  # so the loop's own decrement and branch are noise
_OPS_PER_CALL = 1 << 28  # about 1 ms at 250 GOPS: as long as a BERT-base dense kernel


class PeakUnavailableError(CanaoError):
    """The int8 peak loop cannot be built or run on this host."""


@dataclass(frozen=True)
class PeakLoop:
    isa: str
    cpu_flag: str  # the /proc/cpuinfo flag the instructions need
    round: tuple[str, ...]  # AT&T assembly, one instruction per entry
    ops_per_round: int  # int8 operations: 2 per multiply-add


def _dot_round(register: str, prefix: str, lanes: int) -> tuple[tuple[str, ...], int]:
    """``vpdpbusd`` into each accumulator: operands in registers 14 (uint8) and 15 (int8)."""
    round_ = tuple(
        f"{prefix}vpdpbusd %{register}15, %{register}14, %{register}{i}"
        for i in range(_DOT_ACCUMULATORS)
    )
    return round_, _DOT_ACCUMULATORS * lanes * 4 * 2


def _pair_round(products: tuple[str, ...], macs_per_product: int) -> tuple[tuple[str, ...], int]:
    """Each product (ymm 6..11) made by ``products`` then added into its accumulator (0..5)."""
    round_: list[str] = []
    for i in range(_PAIR_ACCUMULATORS):
        product = f"%ymm{_PAIR_ACCUMULATORS + i}"
        round_ += [step.format(product=product) for step in products]
        round_.append(f"vpaddd {product}, %ymm{i}, %ymm{i}")
    return tuple(round_), _PAIR_ACCUMULATORS * macs_per_product * 2


def _loops() -> dict[str, PeakLoop]:
    # vpmaddubsw: uint8 (ymm14) x int8 (ymm15) pairs summed to int16; vpmaddwd by ones
    # (ymm13) sums those pairs to int32, as the 7-bit kernel does.
    u7_round, u7_ops = _pair_round(
        ("vpmaddubsw %ymm15, %ymm14, {product}", "vpmaddwd %ymm13, {product}, {product}"), 32
    )
    wd_round, wd_ops = _pair_round(("vpmaddwd %ymm15, %ymm14, {product}",), 16)
    return {
        "avx512-vnni": PeakLoop("avx512-vnni", "avx512_vnni", *_dot_round("zmm", "", 16)),
        "avx-vnni": PeakLoop("avx-vnni", "avx_vnni", *_dot_round("ymm", "{vex} ", 8)),
        "avx2-u7": PeakLoop("avx2-u7", "avx2", u7_round, u7_ops),
        "avx2": PeakLoop("avx2", "avx2", wd_round, wd_ops),
    }


PEAK_LOOPS: dict[str, PeakLoop] = _loops()


def peak_loop(isa: str) -> PeakLoop:
    if isa not in PEAK_LOOPS:
        raise PeakUnavailableError(
            f"no assembly peak loop for int8 ISA {isa!r}; there are loops for "
            f"{', '.join(PEAK_LOOPS)} (x86 only)"
        )
    return PEAK_LOOPS[isa]


def _escaped(line: str) -> str:
    return line.replace("%", "%%").replace("{", "%{").replace("}", "%}")


def c_source(loop: PeakLoop) -> str:
    """``void canao_int8_peak(int64_t iterations)``: the rounds in a counted loop."""
    setup = [f"vpxor %xmm{i}, %xmm{i}, %xmm{i}" for i in range(14)]  # zero accumulators
    setup += ["vpcmpeqd %ymm14, %ymm14, %ymm14", "vpcmpeqd %ymm15, %ymm15, %ymm15"]
    body = list(loop.round) * _ROUNDS_PER_ITERATION
    # Extended asm: registers are written %%name, braces %{ %} (bare ones pick an assembler
    # dialect); %0 is the iteration count.
    lines = [_escaped(line) for line in (*setup, "1:", *body)]
    lines += ["sub $1, %0", "jnz 1b", "vzeroupper"]
    asm = "\n".join(f'        "{line}\\n\\t"' for line in lines)
    clobbers = ", ".join(f'"xmm{i}"' for i in range(16))
    return (
        "#include <stdint.h>\n\n"
        f"/* int8 peak loop for {loop.isa}: {loop.ops_per_round} int8 ops per round, "
        f"{_ROUNDS_PER_ITERATION} rounds per iteration. */\n"
        "void canao_int8_peak(int64_t iterations) {\n"
        "    __asm__ volatile(\n"
        f"{asm}\n"
        '        : "+r"(iterations)\n'
        "        :\n"
        f'        : {clobbers}, "cc");\n'
        "}\n"
    )


def build_peak_library(isa: str, directory: Path) -> Path:
    """Compile ``isa``'s loop into ``directory``/libcanao_peak_<isa>.so (any x86 host can
    build every loop: the assembler takes instructions this CPU does not have)."""
    loop = peak_loop(isa)
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise PeakUnavailableError(
            "no C compiler (cc or gcc) on PATH: the int8 peak loop is assembly built with "
            "one (apt-get install gcc)"
        )
    name = isa.replace("-", "_")
    source, library = directory / f"canao_peak_{name}.c", directory / f"libcanao_peak_{name}.so"
    source.write_text(c_source(loop))
    built = subprocess.run(
        [compiler, "-O2", "-shared", "-fPIC", "-o", str(library), str(source)],
        capture_output=True,
        text=True,
    )
    if built.returncode != 0:
        first_errors = "\n".join(built.stderr.splitlines()[:5])
        raise PeakUnavailableError(
            f"{compiler} could not build the {isa} peak loop:\n{first_errors}"
        )
    return library


def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags from /proc/cpuinfo (empty where there is none)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((row for row in text.splitlines() if row.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def int8_peak(isa: str, ops_per_call: int = _OPS_PER_CALL) -> tuple[Callable[[], None], int]:
    """(a call of ``isa``'s peak loop, the int8 operations one call does).

    Time the call interleaved with the kernels it is compared with: the clock moves.
    """
    loop = peak_loop(isa)
    machine = platform.machine().lower()
    if machine not in ("x86_64", "amd64"):
        raise PeakUnavailableError(f"the {isa} peak loop is x86 code; this host is {machine}")
    if loop.cpu_flag not in cpu_flags():
        raise PeakUnavailableError(
            f"this CPU lacks {loop.cpu_flag!r} (/proc/cpuinfo), so it cannot run the "
            f"{isa} peak loop"
        )
    directory = Path(tempfile.mkdtemp(prefix="canao-peak-"))
    function = ctypes.CDLL(str(build_peak_library(isa, directory))).canao_int8_peak
    function.argtypes, function.restype = [ctypes.c_int64], None
    ops_per_iteration = loop.ops_per_round * _ROUNDS_PER_ITERATION
    iterations = max(1, ops_per_call // ops_per_iteration)
    return (lambda: function(iterations)), iterations * ops_per_iteration
