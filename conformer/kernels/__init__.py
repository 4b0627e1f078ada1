"""The project's own CPU kernels: C++ sources compiled once per machine into shared libraries for `ops.Custom`.

A kernel is built on first use with the system's C++ compiler (`CXX`, else g++) for this CPU (`-O3 -march=native`;
glibc's vector math library, libmvec, where the kernel includes `vector_math.h`; OpenBLAS from the scipy-openblas32
wheel where it includes `<cblas.h>`), into
`$XDG_CACHE_HOME/conformer/kernels` (default `~/.cache/...`), named by a hash of its sources (its own and the shared
headers), the compiler and the CPU, and moved into place atomically: concurrent processes build it at most once each
and never load half a file. Without a compiler, or when the build fails, `library` says why once and returns None,
and the callers use MindSpore's own kernels.

Which path a process runs is one switch, `select` (the config key `hardware.kernels` calls it): `project` runs these
kernels, `mindspore` runs MindSpore's own ops (what an Ascend or GPU device runs; on the CPU nothing here is built),
`auto` the project's on the CPU in float32 and MindSpore's elsewhere. Models, the optimizer, the step and export ask
`serves(name)` when they build their cells, never the device.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent
# -z defs: a symbol no library provides fails the build (and the caller falls back), not the first call
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-Wl,-z,defs")
VECTOR_MATH = ("-lmvec", "-lm")


KERNEL_PATHS = ("auto", "project", "mindspore")  # hardware.kernels
_selected = "auto"


def kernel_path_problem(setting: str, device_target: str, amp_level: str = "O0") -> str | None:
    """Why `setting` cannot run on `device_target` at `amp_level`, or None (the rule select and the config check
    share)."""
    if setting not in KERNEL_PATHS:
        return f"choose one of {', '.join(KERNEL_PATHS)}"
    if setting == "project" and device_target != "CPU":
        return f"the project's kernels run on the CPU only, not on {device_target}: use auto or mindspore"
    if setting == "project" and amp_level != "O0":
        return (f"the project's kernels compute in float32 and MindSpore's mixed-precision rewrite cannot rewrite "
                f"their cells, so AMP {amp_level} needs MindSpore's ops: use auto or mindspore (or amp_level O0)")
    return None


def resolve(setting: str, device_target: str, amp_level: str = "O0") -> str:
    """`project` or `mindspore` for a `hardware.kernels` setting: auto takes the project's kernels on the CPU at AMP
    O0 (float32) and MindSpore's ops everywhere else."""
    problem = kernel_path_problem(setting, device_target, amp_level)
    if problem:
        raise ValueError(f"kernels={setting!r}: {problem}")
    if setting == "auto":
        return "project" if device_target == "CPU" and amp_level == "O0" else "mindspore"
    return setting


def select(setting: str, amp_level: str = "O0") -> str:
    """Choose the kernel path for the cells built from now on in this process (`hardware.kernels`); returns the
    resolved path. A cell keeps the path it was built with. `project` demands the compiled kernels: it fails here,
    naming the kernels, when they cannot be built."""
    global _selected
    path = resolve(setting, _device_target(), amp_level)
    if setting == "project":  # asked for by name (auto falls back per kernel, with a warning, where one cannot build)
        missing = build_all()
        if missing:
            raise RuntimeError(f"kernels=project: the CPU kernels {', '.join(missing)} cannot be built here (see the "
                               "warnings above: a C++ compiler, g++ or $CXX, is needed): use kernels=auto or mindspore")
    _selected = path
    return path


def selected() -> str:
    """The path cells are built with now: `project` or `mindspore` (auto resolved for this process's device)."""
    return _selected if _selected != "auto" else resolve("auto", _device_target())


@contextlib.contextmanager
def using(setting: str, amp_level: str = "O0") -> Iterator[str]:
    """`select(setting)` for the cells built inside the block, then the earlier choice again."""
    global _selected
    previous = _selected
    try:
        yield select(setting, amp_level)
    finally:
        _selected = previous


def serves(name: str) -> bool:
    """Whether the project's `<name>` kernel runs in the cells built now: the path is `project` and the kernel could
    be built (the first call builds all kernels, in parallel)."""
    if selected() != "project":
        return False
    build_all()
    return library(name) is not None


def _device_target() -> str:
    import mindspore as ms

    return ms.get_context("device_target")


def cache_dir() -> Path:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "conformer" / "kernels"


@functools.cache
def library(name: str) -> Path | None:
    """The compiled `<name>.cc` of this package, built if needed; None when it cannot be built here."""
    compiler = shutil.which(os.environ.get("CXX", "g++"))
    if compiler is None:
        log.warning("no C++ compiler (g++ or $CXX): %s runs on MindSpore's slower kernel", name)
        return None
    source = SOURCES / f"{name}.cc"
    version = _compiler_version(compiler)
    headers = b"".join(header.read_bytes() for header in sorted(SOURCES.glob("*.h")))
    try:
        flags = _flags(source)
    except ImportError as err:
        log.warning("the %s kernel needs %s (pip install -e .): MindSpore's slower kernel is used", name, err.name)
        return None
    key = hashlib.sha256(source.read_bytes() + headers + version.encode() + _cpu().encode() + " ".join(flags).encode())
    target = cache_dir() / f"{name}-{key.hexdigest()[:16]}.so"
    if target.is_file():
        return target
    try:
        return _build(compiler, source, flags, target)
    except OSError as err:  # the cache folder cannot be written
        log.warning("cannot build the %s kernel in %s (%s): MindSpore's slower kernel is used; set XDG_CACHE_HOME "
                    "to a writable folder", name, target.parent, err)
        return None


@functools.cache
def build_all() -> list[str]:
    """Builds every kernel not in the cache yet, one compiler per core: a machine's first run waits for the slowest
    builds, not their sum. Returns the kernels that cannot be built here (their callers use MindSpore's)."""
    names = sorted(path.stem for path in SOURCES.glob("*.cc"))
    with ThreadPoolExecutor(max_workers=len(os.sched_getaffinity(0))) as pool:
        built = list(pool.map(library, names))
    return [name for name, path in zip(names, built) if path is None]


def _build(compiler: str, source: Path, flags: tuple[str, ...], target: Path) -> Path | None:
    """Compile `source` into `target` through a temporary file, so no process ever loads half a library."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        built = Path(scratch) / target.name
        done = subprocess.run([compiler, "-o", str(built), str(source), *flags], capture_output=True,
                              text=True, check=False)
        if done.returncode != 0:
            log.warning("building the %s kernel failed (%s): MindSpore's slower kernel is used\n%s", source.stem,
                        compiler, done.stderr[-2000:])
            return None
        os.replace(built, target)
    log.info("built the %s CPU kernel: %s", source.stem, target)
    return target


def _flags(source: Path) -> tuple[str, ...]:
    """The compiler's flags for `source`; libraries come after the source, as the linker needs them."""
    text = _with_headers(source)
    flags = FLAGS + (VECTOR_MATH if '"vector_math.h"' in text else ())
    return flags + (_openblas() if "<cblas.h>" in text else ())


def _with_headers(source: Path) -> str:
    """The text of `source` and of the package's headers it includes, directly or through another header."""
    text, seen, pending = "", set(), [source]
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        content = path.read_text()
        text += content
        pending += [SOURCES / name for name in re.findall(r'#include "([^"]+)"', content)]
    return text


def _openblas() -> tuple[str, ...]:
    """Compile and link flags for the OpenBLAS of the scipy-openblas32 wheel (a dependency of the project)."""
    import scipy_openblas32

    lib_dir = scipy_openblas32.get_lib_dir()
    return (f"-I{scipy_openblas32.get_include_dir()}", f"{lib_dir}/lib{scipy_openblas32.get_library()}.so",
            f"-Wl,-rpath,{lib_dir}")


@functools.cache
def _compiler_version(compiler: str) -> str:
    """`compiler --version`, asked once per process (every kernel's cache key has it)."""
    return subprocess.run([compiler, "--version"], capture_output=True, text=True, check=False).stdout


@functools.cache
def _cpu() -> str:
    """What `-march=native` compiles for: the machine and its CPU's model and flags."""
    try:
        info = Path("/proc/cpuinfo").read_text()
        lines = [line for line in info.splitlines() if line.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "\n".join(lines)
