"""The canao command: happy paths and one clear message per bad input."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from canao.cli import main
from canao.latency.rpc import free_port


def test_compile_writes_a_verified_artifact(tmp_path: Path, tiny_config: Path, capsys) -> None:
    out = tmp_path / "out"
    assert (
        main(["compile", str(tiny_config), "--target", "x86", "--seq", "16", "-o", str(out)]) == 0
    )
    printed = capsys.readouterr().out
    assert "numerics vs PyTorch (local): max abs diff" in printed
    assert "kernel_launches=" in printed
    manifest = json.loads((out / "manifest.json").read_text())
    assert (out / "model.so").is_file() and manifest["numerics"]["max_abs_diff"] < 1e-4


def test_bench_prints_a_table_and_csv(tmp_path: Path, tiny_config: Path, capsys) -> None:
    csv = tmp_path / "bench.csv"
    args = [
        "bench",
        str(tiny_config),
        "--seq",
        "16",
        "--pipeline",
        "default,default-fused",
        "--threads",
        "1",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--cache",
        str(tmp_path / "c.sqlite"),
        "--csv",
        str(csv),
    ]
    assert main(args) == 0
    table = capsys.readouterr().out
    assert "median_ms" in table and "default-fused" in table and "kernel_launches" in table
    assert csv.read_text().count("\n") == 3  # header + one row per pipeline
    assert main(args) == 0  # second run is served from the cache
    assert "cached" in capsys.readouterr().out


def test_list(capsys) -> None:
    assert main(["list"]) == 0
    printed = capsys.readouterr().out
    assert "arm64" in printed and "default-fused" in printed and "bert-base" in printed


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["compile", "missing/model", "-o", "x"], "model 'missing/model' not found"),
        (
            ["compile", "bert-tiny", "--target", "tpu", "-o", "x"],
            "unknown target 'tpu'; valid targets: x86, arm64, arm64-dotprod, arm64-i8mm, cuda",
        ),
        (["bench", "bert-tiny", "--pipeline", "warp"], "unknown pipeline 'warp'"),
        (["bench", "bert-tiny", "--key", "phone"], "--key names a device at a tracker"),
    ],
)
def test_bad_input_gives_one_clear_error(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("canao: error: ") and message in err
    assert "Traceback" not in err


def test_malformed_config(tmp_path: Path, capsys) -> None:
    bad = tmp_path / "broken.json"
    bad.write_text('{"hidden_size": ')
    assert main(["compile", str(bad), "-o", str(tmp_path / "o")]) == 2
    assert "not valid JSON" in capsys.readouterr().err


def test_unreachable_device(capsys) -> None:
    port = free_port()
    argv = ["bench", "bert-tiny", "--rpc", f"127.0.0.1:{port}", "--rpc-timeout", "3"]
    assert main(argv) == 2
    assert f"cannot reach the RPC server at 127.0.0.1:{port}" in capsys.readouterr().err


def test_arm64_without_device_is_not_silently_verified(
    tmp_path: Path, tiny_config: Path, capsys
) -> None:
    import shutil

    if shutil.which("aarch64-linux-gnu-gcc") is None:
        pytest.skip("aarch64-linux-gnu-gcc not installed (apt-get install gcc-aarch64-linux-gnu)")
    out = tmp_path / "arm"
    assert (
        main(["compile", str(tiny_config), "--target", "arm64", "--seq", "8", "-o", str(out)]) == 0
    )
    assert "numerics: not run: no arm64 device here; pass --rpc" in capsys.readouterr().out
    assert json.loads((out / "manifest.json").read_text())["numerics"]["checked"] is False


@pytest.mark.slow
def test_compare_prints_table_csv_and_png(tmp_path: Path, tiny_config: Path, capsys) -> None:
    pytest.importorskip("onnxruntime", reason="the baselines extra is not installed")
    out = tmp_path / "cmp"
    argv = [
        "compare",
        str(tiny_config),
        "--seq",
        "16",
        "--threads",
        "1",
        "--repeats",
        "3",
        "--warmup",
        "1",
        "--systems",
        "torch-eager,onnxruntime",
        "-o",
        str(out),
    ]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "canao-fast" in printed and "onnxruntime" in printed and "torch-eager" in printed
    assert (out / "compare.csv").is_file() and (out / "compare.png").stat().st_size > 1000
