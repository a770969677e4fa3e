"""The one latency measurement protocol used across canao.

Warm-up runs, then ``repeats`` timed repeats (each the mean of ``number``
calls), summarised by median, min and inter-quartile range. TVM modules are
timed with the VM's ``time_evaluator`` (on the device itself, so RPC round
trips are not in the number); baselines (torch, ONNX Runtime, LiteRT) are
timed with :func:`time_callable` under the same settings.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone

import numpy as np

from canao.latency.environment import cpu_model, versions

# Blocks per system when several systems are timed interleaved (time_interleaved).
INTERLEAVED_ROUNDS = 4


@dataclass(frozen=True)
class Protocol:
    """How one latency is taken."""

    warmup: int = 3  # untimed runs first: page faults, thread-pool start, caches
    repeats: int = 20  # timed repeats; the statistics are over these
    number: int = 1  # calls averaged inside one repeat (raise for sub-ms kernels)

    def __post_init__(self) -> None:
        if self.warmup < 0 or self.repeats < 1 or self.number < 1:
            raise ValueError(
                f"invalid protocol {self}: need warmup >= 0, repeats >= 1, number >= 1"
            )


@dataclass(frozen=True)
class Measurement:
    """One latency result with everything needed to reproduce it."""

    key: str  # cache key: model/arch hash, target, pipeline, shapes, threads, device
    model: str
    model_hash: str
    target: str
    pipeline: str
    shapes: str  # e.g. "input_ids=1x128,attention_mask=1x128,token_type_ids=1x128"
    threads: int
    median_ms: float
    min_ms: float
    iqr_ms: float
    mean_ms: float
    repeats_ms: tuple[float, ...]
    protocol: Protocol
    device: str  # "local" or "rpc://host:port[/key]"
    cpu_model: str
    versions: dict[str, str] = field(default_factory=dict)
    measured_at: str = ""

    def row(self) -> dict[str, object]:
        """A flat dict for a DataFrame row or a table line."""
        flat = asdict(self)
        flat.pop("repeats_ms")
        proto = flat.pop("protocol")
        flat.update({f"protocol_{name}": value for name, value in proto.items()})
        flat["versions"] = ",".join(f"{k}={v}" for k, v in sorted(self.versions.items()))
        return flat


@dataclass(frozen=True)
class Summary:
    median_ms: float
    min_ms: float
    iqr_ms: float
    mean_ms: float


def summarize(seconds: Sequence[float]) -> Summary:
    """Median, min, IQR and mean, in milliseconds, of per-repeat times in seconds."""
    if len(seconds) == 0:
        raise ValueError("no timings to summarise")
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    q1, median, q3 = np.percentile(ms, [25, 50, 75])
    return Summary(float(median), float(ms.min()), float(q3 - q1), float(ms.mean()))


def time_callable(fn: Callable[[], object], protocol: Protocol) -> list[float]:
    """Per-repeat mean seconds of ``fn()`` under ``protocol`` (for non-TVM runtimes)."""
    for _ in range(protocol.warmup):
        fn()
    results = []
    for _ in range(protocol.repeats):
        start = time.perf_counter()
        for _ in range(protocol.number):
            fn()
        results.append((time.perf_counter() - start) / protocol.number)
    return results


def time_interleaved(
    calls: dict[str, Callable[[], object]],
    protocol: Protocol,
    rounds: int = INTERLEAVED_ROUNDS,
) -> dict[str, list[float]]:
    """Per-repeat seconds of each callable: ``protocol.repeats`` each, in interleaved blocks.

    The machine is shared and noisy, so the repeats are split into ``rounds``
    blocks and the systems take turns block by block (starting system rotating):
    a burst of outside load is spread over all systems instead of landing on
    whichever ran during it. Blocks, not single repeats: ONNX Runtime, OpenMP
    and XNNPACK worker threads spin after a call, and when every repeat
    switched runtime they held the cores the next runtime needed (MiniLM at 2
    threads: LiteRT 28 ms round-robin, 17 ms back to back; equal at 1 thread).
    Each block starts with ``protocol.warmup`` untimed calls, which outlast the
    previous runtime's spinning. ``rounds=1`` is plain back to back.
    """
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    names = list(calls)
    rounds = min(rounds, protocol.repeats)
    sizes = [len(block) for block in np.array_split(np.arange(protocol.repeats), rounds)]
    seconds: dict[str, list[float]] = {name: [] for name in names}
    for round_, size in enumerate(sizes):
        shift = round_ % len(names)
        block = Protocol(warmup=protocol.warmup, repeats=size, number=protocol.number)
        for name in names[shift:] + names[:shift]:
            seconds[name].extend(time_callable(calls[name], block))
    return seconds


def make_measurement(
    seconds: Sequence[float],
    *,
    key: str,
    model: str,
    model_hash: str,
    target: str,
    pipeline: str,
    shapes: str,
    threads: int,
    protocol: Protocol,
    device: str = "local",
    device_cpu: str | None = None,
) -> Measurement:
    """Package raw per-repeat timings with their context."""
    stats = summarize(seconds)
    return Measurement(
        key=key,
        model=model,
        model_hash=model_hash,
        target=target,
        pipeline=pipeline,
        shapes=shapes,
        threads=threads,
        median_ms=stats.median_ms,
        min_ms=stats.min_ms,
        iqr_ms=stats.iqr_ms,
        mean_ms=stats.mean_ms,
        repeats_ms=tuple(float(s) * 1e3 for s in seconds),
        protocol=protocol,
        device=device,
        cpu_model=device_cpu or cpu_model(),
        versions=versions(),
        measured_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
    )


def measurement_key(
    model_hash: str, target: str, pipeline: str, shapes: str, threads: int, device: str = "local"
) -> str:
    """The cache key: same key, same compiled artifact measured the same way on one device.

    It also holds the code fingerprint (kernels generated by other code are other kernels)
    and, for this machine, its CPU (sessions land on different CPUs; "local" is not one).
    """
    from canao.latency.environment import code_fingerprint, host_identity

    where = f"local@{host_identity()}" if device == "local" else device
    return f"{model_hash}|{target}|{pipeline}|{shapes}|t{threads}|{where}|code-{code_fingerprint()}"
