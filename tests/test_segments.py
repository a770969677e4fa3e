"""Candidates stitched from cached segments: the same kernels and output as a whole build."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BertConfig

from canao.compiler.build import compile_model, compile_stitched, export_library
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs, torch_reference
from canao.compiler.kernel_cache import KernelCache
from canao.compiler.segments import SegmentCache
from canao.compiler.targets import get_target
from canao.compiler.verify import verify_locally
from canao.latency.measure import threads_here
from canao.latency.runner import local_runner
from canao.nas.latency import LatencyEvaluator, random_model
from canao.nas.space import ArchConfig
from canao.nas.workloads import SeededWorkloads, segment_keys

BASE = BertConfig(
    vocab_size=120,
    hidden_size=64,
    num_hidden_layers=3,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=32,
)
SPEC = InputSpec(1, 16)
INPUTS = example_inputs(BASE.vocab_size, 1, 16)
# REPEATS has one layer's sizes twice; SHARES reuses WIDE's first layer and REPEATS' first.
WIDE = ArchConfig(64, (2, 2), (128, 64), head_dim=32)
REPEATS = ArchConfig(64, (1, 1, 2), (64, 64, 128), head_dim=32)
SHARES = ArchConfig(64, (2, 1), (128, 64), head_dim=32)


def _caches() -> tuple[SegmentCache, KernelCache]:
    target = str(get_target("x86").tvm_target())
    return SegmentCache(target, "fast", SPEC.shapes()), KernelCache(target)


def _run(compiled: object) -> np.ndarray:
    return local_runner(compiled.executable).run(INPUTS, INPUT_NAMES)  # type: ignore[attr-defined]


def test_segment_keys_tell_repeated_layers_apart() -> None:
    assert segment_keys(REPEATS) == [
        "embeddings-H64",
        "layer-H64-d32-a1-f64#0",
        "layer-H64-d32-a1-f64#1",
        "layer-H64-d32-a2-f128#0",
        "head-H64",
    ]


def test_seeded_workload_is_the_architecture_with_reproducible_distinct_weights() -> None:
    loaded, _ = SeededWorkloads(BASE).model(REPEATS)
    model = loaded.module
    # The same parameters, by name and shape, as the model the architecture describes.
    expected = {k: v.shape for k, v in random_model(REPEATS, BASE).state_dict().items()}
    assert {k: v.shape for k, v in model.state_dict().items()} == expected
    first, second = model.bert.encoder.layer[0], model.bert.encoder.layer[1]
    assert not torch.equal(first.output.dense.weight, second.output.dense.weight)
    # A part made again, by another set of workloads, is the same part.
    again, _ = SeededWorkloads(BASE).model(REPEATS)
    np.testing.assert_array_equal(
        torch_reference(again.module, INPUTS), torch_reference(model, INPUTS)
    )


def test_stitched_equals_whole_build_and_reuses_segments(tmp_path: Path) -> None:
    segments, kernels = _caches()
    workloads = SeededWorkloads(BASE)
    lowered = []
    for arch in (WIDE, REPEATS, SHARES):
        loaded, keys = workloads.model(arch)
        stitched = compile_stitched(loaded, keys, segments, "x86", "fast", SPEC, kernels)
        whole = compile_model(loaded, "x86", "fast", SPEC)
        # The same kernels launched, and the same numbers: not close, equal.
        assert stitched.kernels.kernel_launches == whole.kernels.kernel_launches
        assert stitched.kernels.primfuncs == whole.kernels.primfuncs
        assert stitched.kernels.vm_builtins == whole.kernels.vm_builtins  # one graph, inlined
        np.testing.assert_array_equal(_run(stitched), _run(whole))
        verify_locally(stitched)
        lowered.append(stitched.segments_lowered)
        library = export_library(stitched, tmp_path / f"{arch.key}.so")
        np.testing.assert_array_equal(local_runner(library).run(INPUTS, INPUT_NAMES), _run(whole))
    # WIDE: all 4 new; REPEATS: its two a1-f64 layers (its a2-f128 is WIDE's first);
    # SHARES: nothing (WIDE's first layer, REPEATS' first).
    assert lowered == [4, 2, 0]
    assert len(segments) == 6


def test_stitched_int8_equals_the_whole_int8_build() -> None:
    """The int8 search's candidates: stitched from int8 segments, on this host's int8 kernel
    (AVX-512 VNNI, AVX-VNNI or AVX2), the same kernels and numbers as a whole int8 build."""
    from canao.compiler.schedules.dense_int8 import int8_isa
    from canao.errors import CanaoError

    target = get_target("x86").tvm_target()
    try:
        isa = int8_isa(target)
    except CanaoError:
        pytest.skip("this CPU has no int8 path")
    segments = SegmentCache(str(target), "fast-int8", SPEC.shapes())
    loaded, keys = SeededWorkloads(BASE).model(WIDE)
    stitched = compile_stitched(loaded, keys, segments, "x86", "fast-int8", SPEC)
    whole = compile_model(loaded, "x86", "fast-int8", SPEC)
    names = {gv.name_hint for gv in stitched.lowered.functions}  # type: ignore[attr-defined]
    assert any(name.startswith(f"canao_dense_int8_{isa.replace('-', '_')}") for name in names)
    assert stitched.kernels.kernel_launches == whole.kernels.kernel_launches
    np.testing.assert_array_equal(_run(stitched), _run(whole))
    verify_locally(stitched)


def test_an_evicted_segment_is_lowered_again(tmp_path: Path) -> None:
    segments, kernels = _caches()
    segments.max_segments = 2  # fewer than one model has
    workloads = SeededWorkloads(BASE)
    for _ in range(2):
        loaded, keys = workloads.model(WIDE)
        stitched = compile_stitched(loaded, keys, segments, "x86", "fast", SPEC, kernels)
        verify_locally(stitched)
        assert stitched.segments_lowered == 4
    assert len(segments) == 2


def test_a_segment_cache_refuses_other_shapes() -> None:
    segments, _ = _caches()
    loaded, keys = SeededWorkloads(BASE).model(WIDE)
    with pytest.raises(ValueError, match="segment cache"):
        compile_stitched(loaded, keys, segments, "x86", "fast", InputSpec(1, 8))
    with pytest.raises(ValueError, match="cannot be stitched"):
        compile_stitched(loaded, keys, segments, "x86", "default", SPEC)


def test_latency_evaluator_stitches_and_times_in_memory() -> None:
    evaluator = LatencyEvaluator(BASE, seq=16, threads=threads_here())
    first, shared = evaluator(WIDE), evaluator(SHARES)
    assert first.segments_lowered == 4 and shared.segments_lowered == 1  # SHARES' 2nd layer
    assert first.max_abs_diff is not None and first.max_abs_diff < 1e-4
    assert first.export_s == 0.0  # timed here: nothing exported
    whole = LatencyEvaluator(BASE, seq=16, threads=threads_here(), stitch=False)(WIDE)
    assert whole.segments_lowered is None and whole.max_abs_diff < 1e-4
    # Timed in a child process, the candidate is exported (the child loads the .so).
    child = LatencyEvaluator(BASE, seq=16, threads=threads_here(), in_process=False)(WIDE)
    assert child.export_s > 0 and child.segments_lowered == 4
