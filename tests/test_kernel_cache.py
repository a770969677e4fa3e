"""Kernels compiled once per process and linked into later builds: same output, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from transformers import BertConfig

from canao.compiler.build import compile_model, export_library
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs
from canao.compiler.kernel_cache import KernelCache
from canao.compiler.models import load_model
from canao.latency.runner import local_runner
from canao.nas.latency import random_model
from canao.nas.space import ArchConfig

BASE = BertConfig(
    vocab_size=120,
    hidden_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=128,
    max_position_embeddings=32,
)
SPEC = InputSpec(1, 16)
INPUTS = example_inputs(BASE.vocab_size, 1, 16)
WIDE = ArchConfig(64, (2, 2), (128, 128), head_dim=32)
NARROW = ArchConfig(64, (2, 1), (128, 64), head_dim=32)  # shares its first layer with WIDE


def _host_cache() -> KernelCache:
    from canao.compiler.targets import get_target

    return KernelCache(str(get_target("x86").tvm_target()))


def _outputs(arch: ArchConfig, cache: KernelCache | None, folder: Path) -> tuple[object, ...]:
    compiled = compile_model(
        load_model(random_model(arch, BASE)), "x86", "fast", SPEC, kernel_cache=cache
    )
    library = export_library(compiled, folder / f"{arch.key}-{cache is not None}.so")
    in_memory = local_runner(compiled.executable).run(INPUTS, INPUT_NAMES)
    exported = local_runner(library).run(INPUTS, INPUT_NAMES)
    return compiled, in_memory, exported


def test_linked_from_cache_equals_built_whole_and_reuses(tmp_path: Path) -> None:
    cache = _host_cache()
    stats = []
    for arch in (WIDE, NARROW, WIDE):
        _, whole, _ = _outputs(arch, None, tmp_path)
        compiled, in_memory, exported = _outputs(arch, cache, tmp_path)
        # The same kernels and bytecode: not close, equal.
        np.testing.assert_array_equal(in_memory, whole)
        np.testing.assert_array_equal(exported, whole)
        # Structurally equal kernels of one module share one symbol.
        assert compiled.cached.stats.kernels <= compiled.kernels.primfuncs
        stats.append(compiled.cached.stats)
    first, narrow, again = stats
    assert first.compiled == first.kernels and first.reused == 0
    assert 0 < narrow.reused < narrow.kernels  # the first layer's kernels, not the second's
    assert again.compiled == 0 and again.reused == again.kernels
    assert len(cache) == first.kernels + narrow.compiled


def test_colliding_hashes_never_share_a_kernel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import tvm_ffi

    # Every kernel hashes alike: structural equality must still tell them apart.
    monkeypatch.setattr(tvm_ffi, "structural_hash", lambda *_a, **_k: 7)
    cache = _host_cache()
    _, whole, _ = _outputs(WIDE, None, tmp_path)
    compiled, in_memory, exported = _outputs(WIDE, cache, tmp_path)
    np.testing.assert_array_equal(in_memory, whole)
    np.testing.assert_array_equal(exported, whole)
    assert len(cache) == compiled.cached.stats.kernels > 1


def test_a_cache_serves_one_target() -> None:
    import tvm

    cache = KernelCache("llvm -mtriple=aarch64-linux-gnu")
    compiled = compile_model(load_model(random_model(WIDE, BASE)), "x86", "fast", SPEC)
    func = next(f for f in compiled.lowered.functions.values() if isinstance(f, tvm.tirx.PrimFunc))
    with pytest.raises(ValueError, match="kernel cache for"):
        cache.kernel(func, "k", compiled.target.tvm_target())
