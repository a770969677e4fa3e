"""An emulated aarch64 board that serves TVM RPC on this (x86-64) machine.

Latency and correctness work targets ARM edge boards, but tests and CI run on x86-64
hosts without one. This module builds a small aarch64 userland -- Debian arm64 libc
and CPython 3.11 plus the aarch64 ``apache-tvm`` wheels -- and runs the stock
``python -m tvm.exec.rpc_server`` inside it under ``qemu-aarch64-static`` (user-mode
emulation). A library cross-compiled for ``aarch64-linux-gnu`` is then uploaded over
RPC and executed by real aarch64 code, so ABI, calling-convention and NEON code-gen
problems surface exactly as they would on a board. Timings measured this way are
emulation timings, *not* board latency: use the emulator for correctness only.

Typical use::

    with EmulatedRPCServer() as server:
        remote = server.connect()
        remote.upload(lib_path)
        lib = remote.load_module(os.path.basename(lib_path))

or, from a shell, ``python -m canao.latency.arm_emulation --port 9190``.

Building the root (:func:`ensure_arm64_root`) needs ``qemu-user-static``, ``apt-get``
with the arm64 architecture enabled (done automatically when running as root) and
access to PyPI for the aarch64 wheels. The result is cached under
:func:`default_root` and reused as long as the pinned versions do not change.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterator, Sequence
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO, Any

__all__ = [
    "EmulatedRPCServer",
    "EmulationUnavailable",
    "default_root",
    "emulated_python",
    "ensure_arm64_root",
    "main",
    "qemu_available",
]

QEMU = "qemu-aarch64-static"
# Debian bookworm ships CPython 3.11; the wheels below must match its ABI (cp311).
GUEST_PYTHON = "3.11"
DEB_ARCH = "arm64"
# Roots of the arm64 dependency closure. libstdc++6/libgcc-s1 are not needed by
# CPython itself but by libtvm*.so, so they are roots too.
DEB_ROOTS: tuple[str, ...] = (
    f"python{GUEST_PYTHON}-minimal",
    f"libpython{GUEST_PYTHON}-stdlib",
    "libstdc++6",
    "libgcc-s1",
)
# Client and server must speak the same RPC protocol, so TVM follows the host's install;
# these are only the fallbacks when the host has no TVM distribution metadata.
_FALLBACK_TVM = "0.27.0.post1"
_FALLBACK_TVM_FFI = "0.1.14.post1"
# Everything `import tvm` and `tvm.exec.rpc_server` need in the guest (see the wheels'
# Requires-Dist): numpy, ml_dtypes and typing_extensions are hard requirements of
# tvm/tvm-ffi; cloudpickle is imported by the PopenWorker that hosts the server loop;
# psutil is what tvm.rpc.server uses to reap session workers on a session timeout.
# tornado (the rest of tvm's "rpc" extra) is only for the tracker/proxy, which run on the
# host, so it is left out.
_PINNED_WHEELS: tuple[str, ...] = (
    "numpy==2.4.6",
    "ml_dtypes==0.6.0",
    "typing_extensions==4.15.0",
    "cloudpickle==3.1.2",
    "psutil==7.2.2",
)
_PIP_PLATFORMS: tuple[str, ...] = (
    "manylinux_2_28_aarch64",
    "manylinux_2_17_aarch64",
    "manylinux2014_aarch64",
)
# Bump when the layout of the root changes, so older caches are rebuilt.
_ROOT_FORMAT = 1
_MARKER = ".canao-arm64-root.json"
_BUILDING = ".canao-arm64-root.building"
_WRAPPER = Path("usr/bin/python3-qemu")
_SITE = "site-packages"
_LOG_TAIL_CHARS = 4000
# Host-side supervisor that leads the server's process group. It runs the server and,
# when its stdin reaches EOF -- the owning process closed the pipe or died, even by
# SIGKILL -- kills the whole group, so no emulated server outlives its owner.
# Raw os.read/os._exit: a daemon thread blocked in sys.stdin would abort the interpreter's
# shutdown with a "Fatal Python error" in the server log.
_SUPERVISOR = """
import os, signal, subprocess, sys, threading
child = subprocess.Popen(sys.argv[1:], stdin=subprocess.DEVNULL)
def watch():
    while os.read(0, 4096):
        pass
    os.killpg(0, signal.SIGKILL)
threading.Thread(target=watch, daemon=True).start()
code = child.wait()
os._exit(code if code >= 0 else 128 - code)
"""


class EmulationUnavailable(RuntimeError):
    """The emulated ARM board cannot be provided; the message names what is missing."""


# ---------------------------------------------------------------------------
# Checks and paths
# ---------------------------------------------------------------------------


def qemu_available() -> str | None:
    """Return why ``qemu-aarch64-static`` cannot be used here, or ``None`` if it can."""
    qemu = shutil.which(QEMU)
    if qemu is None:
        return f"{QEMU} not found on PATH: apt-get install qemu-user-static"
    try:
        proc = subprocess.run(
            [qemu, "--version"], capture_output=True, text=True, timeout=30, check=False
        )
    except OSError as err:
        return f"{qemu} cannot be executed ({err}): reinstall qemu-user-static"
    if proc.returncode != 0:
        return f"{qemu} --version failed ({proc.stderr.strip()}): reinstall qemu-user-static"
    return None


def default_root() -> Path:
    """Where the arm64 root lives: ``$CANAO_ARM64_ROOT``, else ``$CANAO_CACHE_DIR/arm64-root``,
    else the user cache."""
    explicit = os.environ.get("CANAO_ARM64_ROOT")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("CANAO_CACHE_DIR")
    base = Path(cache) if cache else Path.home() / ".cache" / "canao"
    return base / "arm64-root"


def _wheel_specs() -> list[str]:
    def host_version(dist: str, fallback: str) -> str:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return fallback

    return [
        f"apache-tvm=={host_version('apache-tvm', _FALLBACK_TVM)}",
        f"apache-tvm-ffi=={host_version('apache-tvm-ffi', _FALLBACK_TVM_FFI)}",
        *_PINNED_WHEELS,
    ]


def _expected_marker() -> dict[str, Any]:
    # Only inputs we choose go here; resolved deb versions are recorded too but a later
    # `apt-get update` must not force a rebuild, so they are not compared.
    return {
        "format": _ROOT_FORMAT,
        "guest_python": GUEST_PYTHON,
        "deb_roots": list(DEB_ROOTS),
        "wheels": _wheel_specs(),
    }


def _marker_valid(root: Path) -> bool:
    try:
        found = json.loads((root / _MARKER).read_text())
    except (OSError, ValueError):
        return False
    expected = _expected_marker()
    return (
        isinstance(found, dict)
        and all(found.get(k) == v for k, v in expected.items())
        and (root / "usr" / "bin" / f"python{GUEST_PYTHON}").is_file()
    )


def _tail(text: str, limit: int = _LOG_TAIL_CHARS) -> str:
    text = text.strip()
    return text if len(text) <= limit else "..." + text[-limit:]


def _run(
    cmd: Sequence[str | os.PathLike[str]],
    what: str,
    hint: str,
    *,
    cwd: Path | None = None,
    timeout: float = 900,
    env: dict[str, str] | None = None,
) -> str:
    """Run ``cmd``; on failure raise EmulationUnavailable naming the step and a fix."""
    try:
        proc = subprocess.run(
            [os.fspath(c) for c in cmd],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
    except FileNotFoundError as err:
        raise EmulationUnavailable(f"{what} failed: {err.filename} not found: {hint}") from err
    except subprocess.TimeoutExpired as err:
        raise EmulationUnavailable(f"{what} timed out after {timeout:.0f} s: {hint}") from err
    if proc.returncode != 0:
        raise EmulationUnavailable(
            f"{what} failed (exit {proc.returncode}): {hint}\n{_tail(proc.stdout + proc.stderr)}"
        )
    return proc.stdout


# ---------------------------------------------------------------------------
# Building the root
# ---------------------------------------------------------------------------


def _arm64_lists_present() -> bool:
    # `apt-cache show` only knows foreign packages once the arch is enabled and updated.
    proc = subprocess.run(
        ["apt-cache", "show", "--no-all-versions", f"{DEB_ROOTS[0]}:{DEB_ARCH}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0 and "Package:" in proc.stdout


def _enable_arm64_apt() -> None:
    """Make apt know arm64 packages: ``dpkg --add-architecture`` + ``apt-get update``."""
    for tool in ("apt-get", "apt-cache", "dpkg"):
        if shutil.which(tool) is None:
            raise EmulationUnavailable(
                f"{tool} not found: the arm64 root is built from Debian arm64 packages, "
                f"so build it on a Debian host (or point CANAO_CACHE_DIR at a built root)"
            )
    if _arm64_lists_present():
        return
    fix = f"run `dpkg --add-architecture {DEB_ARCH} && apt-get update` as root"
    if os.geteuid() != 0:
        raise EmulationUnavailable(f"apt has no {DEB_ARCH} package lists: {fix}")
    _run(["dpkg", "--add-architecture", DEB_ARCH], "dpkg --add-architecture", fix)
    _run(["apt-get", "update", "-q"], "apt-get update", fix, timeout=900)
    if not _arm64_lists_present():
        raise EmulationUnavailable(
            f"apt has no {DEB_ROOTS[0]}:{DEB_ARCH} even after `apt-get update`: the root "
            f"needs Debian bookworm's arm64 archive (python{GUEST_PYTHON}) in apt's sources"
        )


def _resolve_debs() -> list[str]:
    """Closure of DEB_ROOTS over Depends/Pre-Depends, restricted to real arm64 packages.

    Arch-independent packages (media-types, readline-common, ...) only carry data files
    the interpreter does not need, and following them would drag in dpkg, perl and tar,
    so the walk does not go through them. Virtual packages (``<name>``) are skipped.
    """
    roots = [f"{p}:{DEB_ARCH}" for p in DEB_ROOTS]
    out = _run(
        [
            "apt-cache",
            "depends",
            "--recurse",
            "--no-recommends",
            "--no-suggests",
            "--no-conflicts",
            "--no-breaks",
            "--no-replaces",
            "--no-enhances",
            *roots,
        ],
        "apt-cache depends",
        f"run `dpkg --add-architecture {DEB_ARCH} && apt-get update` as root",
    )
    graph: dict[str, list[str]] = {}
    current: str | None = None
    dep_line = re.compile(r"^ [ |](?:Pre)?Depends: (\S+)$")
    for line in out.splitlines():
        if not line.startswith(" "):
            current = line.strip()
            graph.setdefault(current, [])
        elif current is not None and (m := dep_line.match(line)):
            graph[current].append(m.group(1))
    seen: list[str] = []
    todo = list(roots)
    while todo:
        pkg = todo.pop(0)
        if pkg in seen:
            continue
        seen.append(pkg)
        todo.extend(
            d for d in graph.get(pkg, []) if d.endswith(f":{DEB_ARCH}") and not d.startswith("<")
        )
    return sorted(seen)


def _download_debs(packages: list[str], dest: Path) -> None:
    cmd = ["apt-get", "download", "-q", "-o", "APT::Sandbox::User=root", *packages]
    hint = f"run `dpkg --add-architecture {DEB_ARCH} && apt-get update` as root and retry"
    try:
        _run(cmd, f"apt-get download of {DEB_ARCH} packages", hint, cwd=dest)
    except EmulationUnavailable:
        # Stale package lists make the archive answer 404; refresh once when we may.
        if os.geteuid() != 0:
            raise
        _run(["apt-get", "update", "-q"], "apt-get update", hint)
        _run(cmd, f"apt-get download of {DEB_ARCH} packages", hint, cwd=dest)


def _extract_debs(debs: Path, root: Path) -> dict[str, str]:
    versions: dict[str, str] = {}
    for deb in sorted(debs.glob("*.deb")):
        _run(["dpkg-deb", "-x", deb, root], f"dpkg-deb -x {deb.name}", "is dpkg installed?")
        name, version, _arch = deb.stem.split("_")
        versions[name] = version.replace("%3a", ":")
    return versions


def _relativize_symlinks(root: Path) -> None:
    """Point absolute symlinks inside ``root`` at ``root`` itself.

    qemu's ``-L`` only redirects paths the guest passes to syscalls; the kernel resolves
    a symlink such as ``usr/lib/python3.11/sitecustomize.py -> /etc/python3.11/...``
    against the *host* file system, so left alone it would run host files in the guest.
    """
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            link = Path(dirpath) / name
            if not link.is_symlink():
                continue
            target = os.readlink(link)
            if os.path.isabs(target):
                inside = root / target.lstrip("/")
                link.unlink()
                link.symlink_to(os.path.relpath(inside, link.parent))


def _download_wheels(specs: list[str], dest: Path) -> list[Path]:
    platforms = [arg for p in _PIP_PLATFORMS for arg in ("--platform", p)]
    py = GUEST_PYTHON.replace(".", "")
    _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--no-deps",
            "--python-version",
            py,
            "--implementation",
            "cp",
            *platforms,
            "-d",
            dest,
            *specs,
        ],
        "pip download of aarch64 wheels",
        f"PyPI must be reachable and have aarch64 wheels for: {' '.join(specs)}",
    )
    return sorted(dest.glob("*.whl"))


def _extract_wheel(wheel: Path, site: Path) -> None:
    # A wheel is a zip laid out as site-packages; unpacking it is an install as far as
    # `import` is concerned. zipfile drops permission bits, so restore them by hand.
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            name = info.filename
            parts = name.split("/")
            if parts[0].endswith(".data"):
                if len(parts) < 3 or parts[1] not in ("purelib", "platlib"):
                    continue  # scripts/headers/data are not needed to import
                name = "/".join(parts[2:])
            target = site / name
            if info.is_dir():
                target.mkdir(parents=True, exist_ok=True)
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            mode = (info.external_attr >> 16) & 0o777
            if mode:
                target.chmod(mode)


def _byte_compile(root: Path) -> None:
    """Pre-compile .pyc files: it halves `import tvm` under qemu (about 9 s -> 4 s).

    Debian builds its .pyc in postinst scripts we never run. Within one CPython minor
    version the bytecode format is fixed, so a host 3.11 compiles them in a few seconds;
    otherwise the guest does it itself (slower, still a one-off). Failures only cost
    speed, never correctness, so they are ignored.
    """
    dirs = [root / _SITE, root / "usr" / "lib" / f"python{GUEST_PYTHON}"]
    if f"{sys.version_info[0]}.{sys.version_info[1]}" == GUEST_PYTHON:
        python: list[str] = [sys.executable]
    else:
        python = [os.fspath(root / _WRAPPER)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    subprocess.run(
        [*python, "-m", "compileall", "-q", "-j", "0", *map(os.fspath, dirs)],
        env=env,
        capture_output=True,
        timeout=1800,
        check=False,
    )


def _write_wrapper(root: Path, qemu: str) -> Path:
    """Write ``usr/bin/python3-qemu``: a host shell script that runs the guest CPython.

    ``-0`` sets the guest's argv[0] to the wrapper, so the guest's ``sys.executable`` is
    the wrapper and the subprocesses TVM starts with it (the RPC server's PopenWorker)
    go through qemu as well instead of failing with "Exec format error". Host variables
    that would point the guest at x86-64 code are dropped.
    """
    wrapper = root / _WRAPPER
    guest = root / "usr" / "bin" / f"python{GUEST_PYTHON}"
    q = shlex.quote
    wrapper.write_text(
        "#!/bin/sh\n"
        "# Generated by canao.latency.arm_emulation: aarch64 CPython under qemu user mode.\n"
        "unset PYTHONHOME PYTHONSTARTUP LD_LIBRARY_PATH LD_PRELOAD TVM_LIBRARY_PATH\n"
        f"export PYTHONPATH={q(os.fspath(root / _SITE))}\n"
        "export PYTHONNOUSERSITE=1\n"
        f"exec {q(qemu)} -L {q(os.fspath(root))} -0 {q(os.fspath(wrapper))} "
        f'{q(os.fspath(guest))} "$@"\n'
    )
    wrapper.chmod(0o755)
    return wrapper


def _verify(root: Path, tvm_spec: str) -> None:
    want = tvm_spec.split("==", 1)[1]
    code = "import tvm, tvm.exec.rpc_server, cloudpickle; print(tvm.__version__)"
    out = _run(
        [root / _WRAPPER, "-c", code],
        "import tvm under qemu",
        f"the arm64 root at {root} is broken; delete it to rebuild",
        timeout=600,
    )
    got = out.strip().splitlines()[-1] if out.strip() else ""
    if got != want:
        raise EmulationUnavailable(
            f"import tvm under qemu reported version {got!r}, expected {want!r}: "
            f"delete {root} to rebuild"
        )


@contextlib.contextmanager
def _locked(root: Path) -> Iterator[None]:
    # Concurrent test workers would otherwise build into the same directory.
    root.parent.mkdir(parents=True, exist_ok=True)
    with open(root.parent / f".{root.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _clear_root(root: Path) -> None:
    if not root.exists():
        return
    ours = (root / _MARKER).exists() or (root / _BUILDING).exists()
    if not ours and any(root.iterdir()):
        raise EmulationUnavailable(
            f"{root} exists and is not a canao arm64 root; refusing to delete it: "
            f"pass another root or set CANAO_CACHE_DIR"
        )
    shutil.rmtree(root)


def ensure_arm64_root(root: Path | None = None) -> Path:
    """Build (once) and return an aarch64 userland with CPython and TVM.

    Steps: enable apt's arm64 lists if missing, download the arm64 closure of
    CPython/libstdc++ with ``apt-get download`` and unpack it with ``dpkg-deb -x``,
    download the aarch64 wheels with ``pip download`` and unzip them into
    ``ROOT/site-packages``, byte-compile, write the qemu wrapper, and check that
    ``import tvm`` works under qemu. A marker holding the versions is written last, so
    an interrupted build, or one for other versions, is rebuilt on the next call.
    """
    reason = qemu_available()
    if reason is not None:
        raise EmulationUnavailable(reason)
    qemu = shutil.which(QEMU)
    assert qemu is not None  # checked by qemu_available()
    root = (root or default_root()).expanduser().absolute()
    if _marker_valid(root):
        # Cheap, and keeps the wrapper right if qemu or the root moved.
        _write_wrapper(root, qemu)
        return root
    with _locked(root):
        if _marker_valid(root):
            _write_wrapper(root, qemu)
            return root
        started = time.monotonic()
        _clear_root(root)
        _enable_arm64_apt()
        root.mkdir(parents=True)
        (root / _BUILDING).touch()
        downloads = root / "_downloads"
        debs_dir, wheels_dir = downloads / "debs", downloads / "wheels"
        debs_dir.mkdir(parents=True)
        wheels_dir.mkdir(parents=True)

        packages = _resolve_debs()
        _download_debs(packages, debs_dir)
        deb_versions = _extract_debs(debs_dir, root)
        _relativize_symlinks(root)

        specs = _wheel_specs()
        site = root / _SITE
        site.mkdir()
        wheels = _download_wheels(specs, wheels_dir)
        for wheel in wheels:
            _extract_wheel(wheel, site)
        # The downloads are no longer needed and are ~130 MB.
        shutil.rmtree(downloads)

        _write_wrapper(root, qemu)
        _byte_compile(root)
        _verify(root, specs[0])

        marker = {
            **_expected_marker(),
            "debs": deb_versions,
            "wheel_files": [w.name for w in wheels],
            "build_seconds": round(time.monotonic() - started, 1),
        }
        (root / _MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        (root / _BUILDING).unlink()
    return root


def emulated_python(root: Path | None = None) -> Path:
    """Path of a host executable that runs the aarch64 CPython (building the root)."""
    return ensure_arm64_root(root) / _WRAPPER


# ---------------------------------------------------------------------------
# RPC server
# ---------------------------------------------------------------------------


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def _can_connect(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


class EmulatedRPCServer:
    """A TVM RPC server running as aarch64 code under qemu, as a context manager.

    Args:
        port: port to serve on; 0 picks a free one (read :attr:`port` after entering).
        key: device key the server registers under with ``tracker``. Ignored without a
            tracker, because the stock server would then demand the key from direct
            clients too and a plain ``rpc.connect(host, port)`` would be rejected.
        tracker: ``(host, port)`` of an RPC tracker to register with.
        root: arm64 root (default :func:`default_root`); built if needed.
        start_timeout_s: how long to wait for the server to accept connections.
        host: address to bind; 127.0.0.1 keeps the (unauthenticated) server local.
        runtime_only: load only ``libtvm_runtime.so`` in the guest, as a deployed board
            would; starts ~3 s faster but lacks the extra runtime functions.
    """

    def __init__(
        self,
        port: int = 0,
        key: str = "arm64-emu",
        tracker: tuple[str, int] | None = None,
        root: Path | None = None,
        start_timeout_s: float = 180,
        *,
        host: str = "127.0.0.1",
        runtime_only: bool = False,
    ) -> None:
        self.host = host
        self.port = port
        self.key = key
        self.tracker = tracker
        self.root = root
        self.start_timeout_s = start_timeout_s
        self.runtime_only = runtime_only
        self._proc: subprocess.Popen[bytes] | None = None
        self._tmp: tempfile.TemporaryDirectory[str] | None = None
        self._log: IO[bytes] | None = None

    # -- lifecycle ---------------------------------------------------------

    def __enter__(self) -> EmulatedRPCServer:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def start(self) -> None:
        """Start the server and wait until it accepts connections."""
        if self._proc is not None:
            raise RuntimeError("EmulatedRPCServer is already running")
        self.root = ensure_arm64_root(self.root)
        first = self.port or _free_port(self.host)
        # --port-end is exclusive. A fixed port must be that port; for a picked one a
        # little range absorbs the race with other processes grabbing it meanwhile.
        last = first + 1 if self.port else min(first + 32, 65536)
        cmd = [
            os.fspath(self.root / _WRAPPER),
            "-m",
            "tvm.exec.rpc_server",
            "--host",
            self.host,
            "--port",
            str(first),
            "--port-end",
            str(last),
        ]
        if self.tracker is not None:
            cmd += ["--key", self.key, "--tracker", f"{self.tracker[0]}:{self.tracker[1]}"]
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        if self.runtime_only:
            env["TVM_USE_RUNTIME_LIB"] = "1"
        self._tmp = tempfile.TemporaryDirectory(prefix="canao-arm64-rpc-")
        self._log = open(Path(self._tmp.name) / "server.log", "wb")  # noqa: SIM115
        # A session of its own: the server forks workers that would outlive a killed
        # parent, so stop() (or the supervisor, if we die) signals the whole group.
        try:
            self._proc = subprocess.Popen(
                [sys.executable, "-I", "-c", _SUPERVISOR, *cmd],
                stdin=subprocess.PIPE,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                cwd=self._tmp.name,
                env=env,
                start_new_session=True,
            )
            self.port = self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _wait_ready(self) -> int:
        deadline = time.monotonic() + self.start_timeout_s
        bound = re.compile(rb"bind to \S+:(\d+)")
        port: int | None = None
        while time.monotonic() < deadline:
            assert self._proc is not None
            if self._proc.poll() is not None:
                raise EmulationUnavailable(
                    f"emulated RPC server exited with code {self._proc.returncode}:\n"
                    f"{self.log_tail()}"
                )
            if port is None and (m := bound.search(self._read_log())):
                port = int(m.group(1))
            # The log line comes right after bind() but before listen(); a TCP connect
            # only succeeds once it listens. The server drops such empty connections.
            if port is not None and self._ready(port):
                return port
            time.sleep(0.25)
        raise EmulationUnavailable(
            f"emulated RPC server not ready after {self.start_timeout_s:.0f} s:\n{self.log_tail()}"
        )

    def _ready(self, port: int) -> bool:
        if self.tracker is None:
            return _can_connect(self.host, port)
        # With a tracker, be ready only once it lists us, so request() finds the key.
        from tvm import rpc

        try:
            session = rpc.connect_tracker(*self.tracker)
            try:
                summary = session.summary()
            finally:
                session.close()
        except (OSError, RuntimeError):
            return False
        # Match the port too: other boards may be registered under the same key.
        return any(
            info.get("key") == f"server:{self.key}" and list(info.get("addr", []))[1:] == [port]
            for info in summary.get("server_info", [])
        )

    def stop(self) -> None:
        """Kill the server's process group (server, PopenWorker, session workers)."""
        proc, self._proc = self._proc, None
        if proc is not None:
            for sig, grace in ((signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                try:
                    proc.wait(timeout=grace)
                    break
                except subprocess.TimeoutExpired:
                    continue
            # Forked session workers may still be exiting after SIGTERM; make sure.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.stdin is not None:
                proc.stdin.close()
        if self._log is not None:
            self._log.close()
            self._log = None
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    # -- helpers -------------------------------------------------------------

    def _read_log(self) -> bytes:
        if self._tmp is None:
            return b""
        try:
            return (Path(self._tmp.name) / "server.log").read_bytes()
        except OSError:
            return b""

    def log_tail(self, limit: int = _LOG_TAIL_CHARS) -> str:
        """The last ``limit`` characters of the server's combined stdout/stderr."""
        return _tail(self._read_log().decode("utf-8", "replace"), limit)

    def connect(self, session_timeout: float = 0) -> Any:
        """Open an RPC session (``tvm.rpc.RPCSession``) to this server."""
        from tvm import rpc

        if self.tracker is not None:
            tracker = rpc.connect_tracker(*self.tracker)
            return tracker.request(self.key, session_timeout=session_timeout)
        return rpc.connect(self.host, self.port, session_timeout=session_timeout)


def main(argv: Sequence[str] | None = None) -> int:
    """Serve TVM RPC from the emulated board until interrupted."""
    parser = argparse.ArgumentParser(
        prog="python -m canao.latency.arm_emulation",
        description="Serve TVM RPC from an aarch64 CPython running under qemu user mode.",
    )
    parser.add_argument("--host", default="127.0.0.1", help="address to bind")
    parser.add_argument("--port", type=int, default=9190, help="port to serve on (0: any)")
    parser.add_argument("--key", default="arm64-emu", help="device key for the tracker")
    parser.add_argument("--tracker", help="register with the tracker at HOST:PORT")
    parser.add_argument(
        "--root",
        type=Path,
        help="arm64 root (default: $CANAO_CACHE_DIR/arm64-root or ~/.cache/canao/arm64-root)",
    )
    parser.add_argument("--runtime-only", action="store_true", help="load libtvm_runtime only")
    args = parser.parse_args(argv)
    tracker = None
    if args.tracker:
        thost, _, tport = args.tracker.rpartition(":")
        tracker = (thost, int(tport))

    # Turn SIGTERM/SIGHUP into an exception so the process group is cleaned up either way;
    # SIGINT is set explicitly because shells start background jobs with it ignored.
    def _terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    try:
        with EmulatedRPCServer(
            args.port,
            args.key,
            tracker,
            args.root,
            host=args.host,
            runtime_only=args.runtime_only,
        ) as server:
            where = f"tracker {args.tracker} key {args.key}" if tracker else "direct"
            print(f"aarch64 TVM RPC server on {server.host}:{server.port} ({where}); Ctrl-C stops")
            while True:
                time.sleep(3600)
    except EmulationUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
