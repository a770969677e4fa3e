"""The cross-toolchain check: a target that cannot link fails in one line, before any build."""

from __future__ import annotations

import shutil
import stat
from pathlib import Path

import pytest

from canao.cli import main
from canao.compiler import targets
from canao.compiler.targets import get_target
from canao.errors import ToolchainError


def _fake_compiler(folder: Path, stderr: str, rc: int) -> None:
    """An ``aarch64-linux-gnu-gcc`` on PATH that prints ``stderr`` and exits with ``rc``."""
    script = folder / "aarch64-linux-gnu-gcc"
    script.write_text(f"#!/bin/sh\necho '{stderr}' >&2\nexit {rc}\n", encoding="utf-8")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


@pytest.fixture
def fake_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """PATH is only a folder of fakes (scripts name /bin/sh in full); no cached probes."""
    folder = tmp_path / "bin"
    folder.mkdir()
    monkeypatch.setenv("PATH", str(folder))
    targets._probe_link.cache_clear()
    yield folder
    targets._probe_link.cache_clear()


def test_missing_cross_compiler_names_the_package(fake_path: Path) -> None:
    with pytest.raises(ToolchainError, match=r"not on PATH.*apt-get install gcc-aarch64-linux-gnu"):
        get_target("arm64").check_toolchain()


def test_missing_cross_libc_names_libc6_dev_arm64_cross(fake_path: Path) -> None:
    _fake_compiler(fake_path, "/usr/bin/aarch64-linux-gnu-ld: cannot find crti.o: No such file", 1)
    with pytest.raises(ToolchainError) as error:
        get_target("arm64").check_toolchain()
    message = str(error.value)
    assert "crti.o" in message and "libc6-dev-arm64-cross" in message
    assert "\n" not in message


def test_host_target_needs_no_probe(fake_path: Path) -> None:
    get_target("x86").check_toolchain()  # no cross compiler: nothing to check


def test_compile_for_arm64_without_toolchain_fails_before_the_build(
    fake_path: Path, tiny_config: Path, tmp_path: Path, capsys
) -> None:
    _fake_compiler(fake_path, "ld: cannot find crti.o: No such file or directory", 1)
    out = tmp_path / "out"
    assert main(["compile", str(tiny_config), "--target", "arm64", "-o", str(out)]) != 0
    printed = capsys.readouterr().err.strip().splitlines()
    assert len(printed) == 1 and "libc6-dev-arm64-cross" in printed[0]
    assert not out.exists()  # nothing built, nothing half-written


@pytest.mark.skipif(
    shutil.which("aarch64-linux-gnu-gcc") is None, reason="aarch64-linux-gnu-gcc not installed"
)
def test_installed_cross_toolchain_links_a_shared_library() -> None:
    targets._probe_link.cache_clear()
    get_target("arm64").check_toolchain()  # the real probe: compiler, binutils and libc
