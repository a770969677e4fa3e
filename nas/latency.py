"""Latency of a candidate architecture: compiled, checked and measured, or predicted.

:class:`LatencyEvaluator` builds the artifact canao would ship for an
architecture (same pipeline, fusion and target as ``canao compile``), checks
it against PyTorch, and times it under the latency protocol, locally or over
TVM RPC. Latency does not depend on weight values, so a candidate is built
with seeded random weights and cached by its architecture key.

:class:`LatencyPredictor` is a per-kernel cost model fitted to those
measurements: each fused kernel kind (packed dense, fused attention, softmax
exponentials, layer norm / element-wise) costs ``a * work + b``, so a network's
latency is linear in per-kind totals that follow from the architecture alone.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import BertConfig

from canao.compiler.build import (
    CompiledModel,
    can_stitch,
    compile_model,
    compile_stitched,
    export_library,
)
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs
from canao.compiler.kernel_cache import KernelCache, process_kernel_cache
from canao.compiler.models import load_model
from canao.compiler.pipelines import DEFAULT_PIPELINE, INT8_PIPELINES, codegen_pipeline
from canao.compiler.segments import SegmentCache
from canao.compiler.targets import get_target
from canao.compiler.verify import compare, verify, verify_locally
from canao.latency.cache import LatencyCache
from canao.latency.environment import default_threads
from canao.latency.measure import TimedRun, Workload, measure, threads_here
from canao.latency.protocol import (
    Protocol,
    make_measurement,
    measurement_key,
    summarize,
    time_interleaved,
)
from canao.latency.rpc import RPCAddress, remote_runner
from canao.latency.runner import DeviceRunner, local_runner
from canao.nas.modeling import CanaoBertForSequenceClassification, arch_config
from canao.nas.space import ArchConfig, contains
from canao.nas.workloads import SeededWorkloads


@dataclass(frozen=True)
class LatencyResult:
    median_ms: float
    cached: bool
    build_s: float = 0.0  # import, pipeline and code generation (linking cached kernels)
    export_s: float = 0.0  # writing and linking the shared library
    kernels_compiled: int | None = None  # kernels generated for this build (the rest reused)
    segments_lowered: int | None = None  # segments imported and lowered now (None: not stitched)
    launches: int | None = None
    max_abs_diff: float | None = None
    # The anchor build's median timed interleaved with this one, and the candidate's
    # median over it: the machine's load drifts, the ratio much less (None: no anchor).
    anchor_ms: float | None = None
    anchored_ms: float | None = None  # ratio x the anchor's first median: ranks candidates
    retimed: int = 0  # times timed again (wide spread, or out of order with a sub-network)
    predicted: bool = False  # the predictor's latency, not built or timed (search --screen)

    @property
    def ratio(self) -> float | None:
        return None if self.anchor_ms is None else self.median_ms / self.anchor_ms

    @property
    def ranked_ms(self) -> float:
        """The latency the search ranks by: anchored where measured so, else the median."""
        return self.median_ms if self.anchored_ms is None else self.anchored_ms


def random_model(arch: ArchConfig, base: BertConfig) -> CanaoBertForSequenceClassification:
    """``arch`` with seeded random weights: the latency workload (weights do not change it)."""
    torch.manual_seed(0)
    return CanaoBertForSequenceClassification(arch_config(arch, base)).eval()


def arch_hash(arch: ArchConfig, base: BertConfig) -> str:
    # Sizes only: which teacher layers a sub-network keeps does not change its latency.
    fields = (
        f"{arch.shape_key}|vocab{base.vocab_size}|pos{base.max_position_embeddings}"
        f"|{base.hidden_act}"
    )
    return "arch-" + hashlib.sha256(fields.encode()).hexdigest()[:16]


@dataclass
class _Anchor:
    folder: tempfile.TemporaryDirectory[str]
    runner: DeviceRunner
    call: Callable[[], object]
    reference_ms: float | None = None  # anchored latencies are in these ms (_reference_ms)


@dataclass
class LatencyEvaluator:
    """Compile -> verify -> measure one architecture, with a persistent cache."""

    base: BertConfig
    target: str = "x86"
    pipeline: str = DEFAULT_PIPELINE
    seq: int = 128
    batch: int = 1
    threads: int | None = None
    protocol: Protocol = field(default_factory=lambda: Protocol(warmup=3, repeats=15))
    rpc: RPCAddress | None = None
    rpc_timeout_s: float = 20.0
    cache: LatencyCache | None = None
    in_process: bool = True
    # A reference architecture (the teacher) timed interleaved with every candidate, in
    # blocks, in this process; local in-process measurement only (None: off).
    anchor: ArchConfig | None = None
    # Kernels compiled by an earlier candidate are linked, not generated again (same code).
    reuse_kernels: bool = True
    # Candidates are stitched from segments (embeddings, each layer, head) lowered once
    # (compiler.segments); off: every candidate is imported and lowered whole.
    stitch: bool = True
    # Anchored candidates whose IQR exceeds this fraction of their median, or that are out
    # of order with a sub-network (or container) measured before by more, are timed again.
    noise_band: float = 0.05
    retime_limit: int = 2
    _anchor: _Anchor | None = field(default=None, init=False, repr=False)
    _workloads: SeededWorkloads | None = field(default=None, init=False, repr=False)
    _segments: SegmentCache | None = field(default=None, init=False, repr=False)
    # Anchored latency (ms) of each architecture this evaluator measured: the order check.
    _recorded: dict[ArchConfig, float] = field(default_factory=dict, init=False, repr=False)

    @property
    def device(self) -> str:
        return self.rpc.label if self.rpc else "local"

    def cached(self, arch: ArchConfig) -> float | None:
        """The median in ms if this architecture was measured before under the same settings."""
        if self.cache is None:
            return None
        hit = self.cache.get(self._key(arch))
        return None if hit is None else hit.median_ms

    def __call__(self, arch: ArchConfig) -> LatencyResult:
        known = self.cached(arch)
        if known is not None:
            return LatencyResult(known, cached=True)
        spec = InputSpec(self.batch, self.seq)
        inputs = example_inputs(self.base.vocab_size, self.batch, self.seq)
        with tempfile.TemporaryDirectory(prefix="canao-candidate-") as tmp:
            compiled, library, export_s = self._build(arch, Path(tmp))
            workload = Workload(
                library=library,
                model=arch.shape_key,
                model_hash=arch_hash(arch, self.base),
                target=self.target,
                pipeline=self.pipeline,
                shapes=spec.shapes(),
                input_names=INPUT_NAMES,
                device_type=compiled.target.device_type,
            )
            anchor_ms, retimed = None, 0
            if self._anchored():
                run, anchor_ms, retimed = self._measure_beside_anchor(arch, workload, inputs)
            else:
                run = measure(
                    workload,
                    inputs,
                    protocol=self.protocol,
                    threads=self.threads,
                    rpc=self.rpc,
                    cache=self.cache,
                    refresh=True,
                    rpc_timeout_s=self.rpc_timeout_s,
                    in_process=self.in_process and self.rpc is None,
                )
        diff = None
        if run.output is not None:
            diff = compare(compiled, run.output, inputs, self.device)["max_abs_diff"]
        median = run.measurement.median_ms
        stats = compiled.cached.stats if compiled.cached is not None else None
        return LatencyResult(
            median,
            cached=False,
            build_s=compiled.build_seconds,
            export_s=export_s,
            kernels_compiled=stats.compiled if stats is not None else None,
            segments_lowered=compiled.segments_lowered,
            launches=compiled.kernels.kernel_launches,
            max_abs_diff=diff,
            anchor_ms=anchor_ms,
            anchored_ms=self._anchored_ms(median, anchor_ms),
            retimed=retimed,
        )

    def _build(self, arch: ArchConfig, folder: Path) -> tuple[CompiledModel, Any, float]:
        """The candidate's shipped artifact, checked against PyTorch before it is timed.

        Returns the build, what is timed and the seconds export took. Timed in this
        process, that is the in-memory executable: the same machine code as the
        exported ``.so`` (identical output, and the same medians within noise side by
        side), without linking a 50-90 MB library per candidate (1-2.5 s). A child
        process or a board gets the exported library.
        """
        spec = InputSpec(self.batch, self.seq)
        compiled = self._stitched(arch, spec)
        if compiled is None:
            compiled = compile_model(
                load_model(random_model(arch, self.base)),
                self.target,
                self.pipeline,
                spec,
                kernel_cache=self._kernel_cache(),
            )
        if self._times_here():
            verify_locally(compiled)
            return compiled, compiled.executable, 0.0
        start = time.perf_counter()
        library = export_library(compiled, folder / "model.so")
        export_s = time.perf_counter() - start
        if self.rpc is not None:
            # Closed before measure() connects: a board serves one session at a time.
            with remote_runner(
                library, self.rpc, compiled.target.device_type, self.rpc_timeout_s
            ) as runner:
                verify(compiled, lambda x: runner.run(x, INPUT_NAMES), self.rpc.label)
        else:
            verify_locally(compiled)
        return compiled, library, export_s

    def _stitched(self, arch: ArchConfig, spec: InputSpec) -> CompiledModel | None:
        """The build stitched from cached segments (None where stitching does not apply)."""
        if not self.stitch:
            return None
        if self._workloads is None:
            self._workloads = SeededWorkloads(self.base)
        loaded, keys = self._workloads.model(arch)
        target = get_target(self.target)
        if not can_stitch(loaded, target, self.pipeline, spec):
            return None
        if self._segments is None:
            self._segments = SegmentCache(str(target.tvm_target()), self.pipeline, spec.shapes())
        return compile_stitched(
            loaded, keys, self._segments, target, self.pipeline, spec, self._kernel_cache()
        )

    def _kernel_cache(self) -> KernelCache | None:
        spec = get_target(self.target)
        if not self.reuse_kernels or spec.device_type != "cpu":
            return None
        return process_kernel_cache(spec.tvm_target(), codegen_pipeline(self.pipeline))

    def _times_here(self) -> bool:
        """Whether candidates are timed in this process (as :func:`measure` decides)."""
        if self.rpc is not None or not self.in_process:
            return False
        wanted = self.threads if self.threads is not None else default_threads()
        return threads_here() == wanted

    def _anchored(self) -> bool:
        return self.anchor is not None and self._times_here()

    def _measure_beside_anchor(
        self, arch: ArchConfig, workload: Workload, inputs: dict[str, np.ndarray]
    ) -> tuple[TimedRun, float, int]:
        """Candidate and anchor take turns block by block; the candidate's result is cached.

        Timed again (samples pooled) while :meth:`_suspect`, at most ``retime_limit`` times;
        returns the run, the anchor's median and how many times it was timed again.
        """
        anchor = self._anchor_build(inputs)
        runner = local_runner(workload.library, workload.device_type)
        output = runner.run(inputs, INPUT_NAMES)
        calls = {"anchor": anchor.call, "candidate": runner.bind(inputs, INPUT_NAMES)}
        seconds = time_interleaved(calls, self.protocol)
        retimed = 0
        while retimed < self.retime_limit and self._suspect(arch, seconds, anchor):
            more = time_interleaved(calls, self.protocol)  # pooled: the median of more samples
            seconds = {name: seconds[name] + more[name] for name in seconds}
            retimed += 1
        measurement = make_measurement(
            seconds["candidate"],
            key=self._key(arch),
            model=workload.model,
            model_hash=workload.model_hash,
            target=workload.target,
            pipeline=workload.pipeline,
            shapes=workload.shapes,
            threads=threads_here(),
            protocol=self.protocol,
        )
        if self.cache is not None:
            self.cache.put(measurement)
        anchor_ms = float(np.median(seconds["anchor"])) * 1e3
        reference = self._reference_ms(anchor, anchor_ms)
        self._recorded[arch] = measurement.median_ms / anchor_ms * reference
        return TimedRun(measurement, output), anchor_ms, retimed

    def remember(self, arch: ArchConfig, anchored_ms: float) -> None:
        """An anchored latency measured before (another process of the study): checked
        against like this process's own."""
        self._recorded.setdefault(arch, anchored_ms)

    def _reference_ms(self, anchor: _Anchor, anchor_ms: float) -> float:
        """The ms an anchored ratio is scaled by: the anchor's own cached latency.

        Cached, it is the same number in every process of a study on this machine (a
        resumed run, a second worker: each used its own first anchor median, so their
        anchored latencies were on different scales); without a cache, this process's
        first anchor median.
        """
        if anchor.reference_ms is None:
            known = self.cached(self.anchor) if self.anchor is not None else None
            anchor.reference_ms = known if known is not None else anchor_ms
        return anchor.reference_ms

    def _suspect(self, arch: ArchConfig, seconds: dict[str, list[float]], anchor: _Anchor) -> bool:
        """Time again? A wide spread, or an order against a sub-network measured before.

        A sub-network does less of every kernel's work than an architecture containing it:
        recorded slower than its container beyond the noise band, one of the two is wrong,
        and only this candidate is still loaded to be timed again.
        """
        candidate = summarize(seconds["candidate"])
        if candidate.iqr_ms > self.noise_band * candidate.median_ms:
            return True
        anchor_ms = float(np.median(seconds["anchor"])) * 1e3
        reference = self._reference_ms(anchor, anchor_ms)
        if abs(anchor_ms / reference - 1) > 2 * self.noise_band:
            # The anchor itself far off its usual time: the machine is disturbed, and the
            # disturbance need not slow both alike (a bandwidth-hungry neighbour slows the
            # large anchor more than a small candidate: 30 -> 48 ms against 4.6 -> 5.4 ms,
            # which made a candidate 25% too fast).
            return True
        ranked = candidate.median_ms / anchor_ms * reference
        limit = 1 + self.noise_band
        for other, other_ms in self._recorded.items():
            if other.shape_key == arch.shape_key:
                continue
            if contains(other, arch) and ranked > other_ms * limit:
                return True  # slower than an architecture that contains it
            if contains(arch, other) and other_ms > ranked * limit:
                return True  # faster than one of its own sub-networks
        return False

    def _anchor_build(self, inputs: dict[str, np.ndarray]) -> _Anchor:
        """Built once per evaluator, and kept loaded (its folder lives as long as it does)."""
        if self._anchor is None:
            assert self.anchor is not None
            folder = tempfile.TemporaryDirectory(prefix="canao-anchor-")
            compiled, library, _ = self._build(self.anchor, Path(folder.name))
            runner = local_runner(library, compiled.target.device_type)
            self._anchor = _Anchor(folder, runner, runner.bind(inputs, INPUT_NAMES))
        return self._anchor

    def _anchored_ms(self, median_ms: float, anchor_ms: float | None) -> float | None:
        """The candidate's ratio to the anchor, in the anchor's reference ms."""
        if anchor_ms is None or self._anchor is None or self._anchor.reference_ms is None:
            return None
        return median_ms / anchor_ms * self._anchor.reference_ms

    def _key(self, arch: ArchConfig) -> str:
        threads = self.threads if self.threads is not None else default_threads()
        shapes = InputSpec(self.batch, self.seq).shapes()
        return measurement_key(
            arch_hash(arch, self.base), self.target, self.pipeline, shapes, threads, self.device
        )


# ---- the per-kernel cost model ----

KERNEL_KINDS = ("dense", "attention", "softmax", "norm", "quantize")
# Register tile of the packed dense kernel (compiler/schedules/dense.py): work is
# done in whole tiles, so padded FLOPs predict its time better than exact ones.
_TILE_M, _TILE_N = 8, 32


def _padded(value: int, multiple: int) -> int:
    return math.ceil(value / multiple) * multiple


def kernel_work(
    arch: ArchConfig, seq: int = 128, batch: int = 1, int8: bool = False
) -> dict[str, tuple[float, int]]:
    """Per kernel kind: (total work, kernel count) of one inference, from the architecture.

    Work is padded multiply-adds for dense and attention products and
    elements touched for softmax, norms and quantizers. Counts follow the fused graph of
    the ``fast`` pipeline: QKV as one dense, attention output, FFN in, FFN out;
    one fused attention kernel per layer (both products and the softmax, whose
    exp work stays a separate feature); two residual+layer norms. An ``int8`` build
    (``fast-int8``) also quantizes each encoder dense layer's input, one kernel per input
    (Q, K and V share theirs): its dense work is int8 multiply-adds, fitted by their own
    cost because a predictor is fitted on one pipeline's timings.
    """
    m = _padded(batch * seq, _TILE_M)
    d = arch.hidden_size
    totals = {kind: [0.0, 0] for kind in KERNEL_KINDS}

    def add(kind: str, work: float, count: int = 1) -> None:
        totals[kind][0] += work
        totals[kind][1] += count

    add("norm", batch * seq * d)  # embeddings' layer norm
    for heads, ffn in zip(arch.heads, arch.ffn, strict=True):
        inner = heads * arch.head_dim
        for k, n in ((d, 3 * inner), (inner, d), (d, ffn), (ffn, d)):
            add("dense", m * k * _padded(n, _TILE_N))
            if int8:
                add("quantize", batch * seq * k)
        add("attention", 2 * batch * heads * seq * seq * arch.head_dim)
        add("softmax", batch * heads * seq * seq, 0)  # inside the attention kernel
        add("norm", 2 * batch * seq * d, 2)
    add("dense", 2 * batch * d * d + batch * d * 2, 2)  # pooler and classifier
    return {kind: (work, count) for kind, (work, count) in totals.items()}


def features(arch: ArchConfig, seq: int = 128, batch: int = 1, int8: bool = False) -> np.ndarray:
    """[work per kind..., kernels per kind..., 1]: the predictor is linear in these."""
    work = kernel_work(arch, seq, batch, int8)
    return np.array(
        [work[k][0] / 1e6 for k in KERNEL_KINDS] + [work[k][1] for k in KERNEL_KINDS] + [1.0]
    )


@dataclass
class LatencyPredictor:
    """Least-squares fit of per-kind costs to measured latencies (ms)."""

    seq: int = 128
    batch: int = 1
    int8: bool = False  # fitted on an int8 pipeline's timings (quantizer kernels counted)
    coef: np.ndarray | None = None

    @classmethod
    def like(cls, evaluator: object) -> LatencyPredictor:
        """An unfitted predictor for the shapes and pipeline ``evaluator`` times."""
        return cls(
            seq=int(getattr(evaluator, "seq", 128)),
            batch=int(getattr(evaluator, "batch", 1)),
            int8=getattr(evaluator, "pipeline", None) in INT8_PIPELINES,
        )

    def _features(self, arch: ArchConfig) -> np.ndarray:
        return features(arch, self.seq, self.batch, self.int8)

    @property
    def fitted(self) -> bool:
        return self.coef is not None

    def fit(self, archs: list[ArchConfig], latency_ms: list[float]) -> LatencyPredictor:
        x = np.stack([self._features(a) for a in archs])
        y = np.asarray(latency_ms, dtype=float)
        # Relative error is what matters (a 1 ms miss on a 2 ms model is large): weight by 1/y.
        w = 1.0 / y
        self.coef = np.linalg.lstsq(x * w[:, None], y * w, rcond=None)[0]
        return self

    def predict(self, arch: ArchConfig) -> float:
        if self.coef is None:
            raise ValueError("predictor not fitted")
        return float(self._features(arch) @ self.coef)

    def holdout_mape(
        self, archs: list[ArchConfig], latency_ms: list[float], folds: int = 5
    ) -> float | None:
        """Mean absolute percentage error on held-out folds (None below 2 * folds points)."""
        if len(archs) < 2 * folds:
            return None
        errors = []
        for fold in range(folds):
            test = [i for i in range(len(archs)) if i % folds == fold]
            train = [i for i in range(len(archs)) if i % folds != fold]
            model = LatencyPredictor(self.seq, self.batch, self.int8).fit(
                [archs[i] for i in train], [latency_ms[i] for i in train]
            )
            errors += [abs(model.predict(archs[i]) / latency_ms[i] - 1) for i in test]
        return float(np.mean(errors))
