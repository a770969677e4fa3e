"""Build, numerics against PyTorch, kernel counts, export and reload on x86."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from canao.compiler.build import (
    compile_model,
    export_artifact,
    read_manifest,
)
from canao.compiler.importer import INPUT_NAMES, InputSpec, example_inputs
from canao.compiler.models import load_model
from canao.compiler.pipelines import PIPELINES, get_pipeline
from canao.compiler.targets import TARGETS, get_target
from canao.compiler.verify import compare, verify_locally
from canao.errors import (
    ArtifactError,
    NumericsMismatchError,
    UnknownPipelineError,
    UnknownTargetError,
)
from canao.latency.runner import local_runner
from tests.conftest import write_config


@pytest.mark.parametrize(
    ("fields", "spec", "head"),
    [
        ({}, InputSpec(1, 32), "base"),
        (
            {"num_hidden_layers": 3, "hidden_size": 96, "num_attention_heads": 3},
            InputSpec(2, 17),
            "base",
        ),
        (
            {"hidden_size": 128, "num_attention_heads": 4, "intermediate_size": 256},
            InputSpec(1, 64),
            "classification",
        ),
    ],
    ids=["L2-H64", "L3-H96-batch2-odd-seq", "H128-classifier"],
)
def test_random_bert_parity(tmp_path: Path, fields: dict, spec: InputSpec, head: str) -> None:
    model = load_model(write_config(tmp_path, **fields), head=head)  # type: ignore[arg-type]
    compiled = compile_model(model, "x86", "default-fused", spec)
    result = verify_locally(compiled)
    assert result["max_abs_diff"] < 1e-4
    assert compiled.numerics == result


def test_minilm_parity_both_pipelines() -> None:
    model = load_model("minilm")
    for pipeline in ("default", "default-fused"):
        compiled = compile_model(model, "x86", pipeline, InputSpec(1, 128))
        assert verify_locally(compiled)["max_abs_diff"] < 1e-4


def test_symbolic_sequence_length(tiny_config: Path) -> None:
    compiled = compile_model(load_model(tiny_config), "x86", "default-fused", InputSpec(1, None))
    runner = local_runner(compiled.executable)
    for seq in (5, 40, 128):  # one executable, three lengths
        inputs = example_inputs(1000, 1, seq)
        out = runner.run(inputs, INPUT_NAMES)
        assert out.shape == (1, seq, 64)
        compare(compiled, out, inputs, "local")


def test_mismatch_is_an_error(tiny_config: Path) -> None:
    compiled = compile_model(load_model(tiny_config), "x86", "default", InputSpec(1, 16))
    inputs = example_inputs(1000, 1, 16)
    good = local_runner(compiled.executable).run(inputs, INPUT_NAMES)
    with pytest.raises(NumericsMismatchError, match="max abs diff"):
        compare(compiled, good + 1e-2, inputs, "local")
    with pytest.raises(NumericsMismatchError, match="max abs diff"):
        compare(compiled, np.full_like(good, np.nan), inputs, "local")
    with pytest.raises(NumericsMismatchError, match="shape"):
        compare(compiled, good[:, :8], inputs, "local")


def test_kernel_report_counts_fusion(tiny_config: Path) -> None:
    model = load_model(tiny_config)
    unfused = compile_model(model, "x86", "default", InputSpec(1, 16)).kernels
    fused = compile_model(model, "x86", "default-fused", InputSpec(1, 16)).kernels
    assert fused.kernel_launches < unfused.kernel_launches
    assert fused.primfuncs < unfused.primfuncs
    assert fused.vm_builtins < unfused.vm_builtins
    assert sum(fused.launches_by_kernel.values()) == fused.kernel_launches
    # Two layers: every per-layer kernel is launched at least twice.
    assert any(name.startswith("fused_matmul") for name in fused.launches_by_kernel)


def test_export_and_reload(tmp_path: Path, tiny_config: Path) -> None:
    compiled = compile_model(load_model(tiny_config), "x86", "default-fused", InputSpec(1, 24))
    verify_locally(compiled)
    folder = export_artifact(compiled, tmp_path / "artifact")
    manifest = read_manifest(folder)
    assert manifest["target"]["name"] == "x86" and manifest["pipeline"] == "default-fused"
    assert manifest["arch"]["layers"] == 2
    assert manifest["inputs"][0] == {"name": "input_ids", "shape": [1, 24], "dtype": "int64"}
    assert manifest["kernels"]["kernel_launches"] == compiled.kernels.kernel_launches
    assert manifest["numerics"]["max_abs_diff"] < 1e-4
    assert {"apache-tvm", "torch", "transformers"} <= set(manifest["versions"])
    # The library alone, loaded fresh, reproduces the in-memory build.
    inputs = example_inputs(1000, 1, 24)
    reloaded = local_runner(folder / manifest["library"]).run(inputs, INPUT_NAMES)
    original = local_runner(compiled.executable).run(inputs, INPUT_NAMES)
    np.testing.assert_array_equal(reloaded, original)


def test_read_manifest_errors(tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match=r"manifest\.json is missing"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ArtifactError, match="malformed JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"library": "model.so"}))
    with pytest.raises(ArtifactError, match="missing fields"):
        read_manifest(tmp_path)


def test_unknown_names_list_the_valid_ones() -> None:
    valid = "valid targets: x86, arm64, arm64-dotprod, arm64-i8mm, cuda"
    with pytest.raises(UnknownTargetError, match=valid):
        get_target("riscv")
    with pytest.raises(UnknownPipelineError, match="valid pipelines: default, default-fused"):
        get_pipeline("fastest", get_target("x86").tvm_target())


def test_targets_describe_their_machines() -> None:
    x86 = str(get_target("x86").tvm_target())
    assert '"mcpu"' in x86 and '"num-cores"' in x86
    assert "aarch64-linux-gnu" in str(get_target("arm64").tvm_target())
    cuda = get_target("cuda").tvm_target()
    assert cuda.kind.name == "cuda" and "gpu" in cuda.keys  # type: ignore[attr-defined]
    assert set(TARGETS) == {"x86", "arm64", "arm64-dotprod", "arm64-i8mm", "cuda"}
    assert "+dotprod" in str(get_target("arm64-dotprod").tvm_target())
    assert "+i8mm" in str(get_target("arm64-i8mm").tvm_target())
    assert all(get_target(name).is_cross for name in TARGETS if name.startswith("arm64"))
    assert {"default", "default-fused"} <= set(PIPELINES)


def _device_sources(module: object, kind: str) -> list[str]:
    found = []
    for sub in getattr(module, "imports", []):
        if getattr(sub, "kind", "") == kind:
            found.append(sub.inspect_source())
        found += _device_sources(sub, kind)
    return found


def test_cuda_code_generation_without_a_gpu(tiny_config: Path) -> None:
    """The cuda target builds here (no GPU needed) and yields CUDA kernels; running is issue 8."""
    compiled = compile_model(load_model(tiny_config), "cuda", "fast", InputSpec(1, 16))
    sources = _device_sources(compiled.executable.mod, "cuda")
    assert sources and sources[0].count("__global__") >= compiled.kernels.primfuncs


def _has_cuda() -> bool:
    import tvm

    return bool(tvm.cuda(0).exist)


@pytest.mark.skipif(not _has_cuda(), reason="no CUDA GPU on this machine (issue 8: run on one)")
def test_cuda_build_runs_matches_pytorch_and_times(tiny_config: Path) -> None:
    from canao.compiler.verify import verify_locally
    from canao.latency.protocol import Protocol
    from canao.latency.runner import local_runner

    compiled = compile_model(load_model(tiny_config), "cuda", "fast", InputSpec(1, 16))
    checked = verify_locally(compiled)  # runs on the GPU; compares with PyTorch
    assert checked["max_abs_diff"] <= checked["tolerance"]
    runner = local_runner(compiled.executable, "cuda")
    from canao.compiler.importer import INPUT_NAMES, example_inputs

    inputs = example_inputs(compiled.model.config.vocab_size, 1, 16)
    seconds = runner.time(inputs, INPUT_NAMES, Protocol(warmup=2, repeats=5))
    assert len(seconds) == 5 and min(seconds) > 0
