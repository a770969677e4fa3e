"""The fusion report and the effect of canao's fusion on a whole BERT."""

from __future__ import annotations

from pathlib import Path

from canao.cli import main
from canao.compiler.build import compile_model
from canao.compiler.importer import InputSpec, import_bert
from canao.compiler.models import load_model
from canao.compiler.targets import get_target
from canao.compiler.verify import verify_locally
from canao.fusion.report import dataflow_graph, fusion_report, graph_summary


def test_report_walks_every_stage_and_ends_at_the_real_launch_count(tiny_config: Path) -> None:
    model = load_model(tiny_config)
    imported = import_bert(model.module, InputSpec(1, 16))
    target = get_target("x86").tvm_target()
    canao = fusion_report(imported, target, canao_fusion=True)
    tvm_only = fusion_report(imported, target, canao_fusion=False)
    stages = list(canao.stage)
    assert stages[0] == "imported" and "fuse_residual_layer_norm" in stages
    graph_rows = canao.iloc[:-1]
    assert graph_rows.operators.is_monotonic_decreasing  # no pass adds operators
    # Bytes may rise at a pass whose outputs are views FuseOps absorbs (merged Q/K/V slices).
    assert graph_rows.intermediate_bytes.iloc[-1] < graph_rows.intermediate_bytes.iloc[0]
    compiled = compile_model(model, "x86", "fast", InputSpec(1, 16))
    assert canao.kernel_calls.iloc[-1] == compiled.kernels.kernel_launches
    assert canao.kernel_calls.iloc[-1] < tvm_only.kernel_calls.iloc[-1]
    assert canao.intermediate_bytes.iloc[-2] < tvm_only.intermediate_bytes.iloc[-2]


def test_graph_counts_bytes_of_intermediates_only(tiny_config: Path) -> None:
    imported = import_bert(load_model(tiny_config).module, InputSpec(1, 16))
    graph = dataflow_graph(imported)
    outputs = [n for n, d in graph.nodes(data=True) if d["is_output"]]
    assert len(outputs) == 1 and graph.nodes[outputs[0]]["bytes"] == 16 * 64 * 4
    summary = graph_summary(graph)
    total = sum(d["bytes"] for _, d in graph.nodes(data=True))
    assert summary["intermediate_bytes"] == total - 16 * 64 * 4


def test_fused_and_unfused_builds_agree_with_pytorch(tiny_config: Path) -> None:
    model = load_model(tiny_config)
    for pipeline in ("fast", "fast-tvm-fusion"):
        compiled = compile_model(model, "x86", pipeline, InputSpec(2, 24))
        assert verify_locally(compiled)["max_abs_diff"] < 1e-5


def test_cli_prints_the_report(tiny_config: Path, capsys) -> None:
    argv = [
        "bench",
        str(tiny_config),
        "--seq",
        "16",
        "--threads",
        "1",
        "--repeats",
        "2",
        "--warmup",
        "1",
        "--no-cache",
        "--fusion-report",
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "fusion report" in printed and "fold_scale_into_dense" in printed
    assert "lowered: kernels launched per inference" in printed
