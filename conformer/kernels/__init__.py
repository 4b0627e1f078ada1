"""The project's own CPU kernels: C++ sources compiled once per machine into shared libraries for `ops.Custom`.

A kernel is built on first use with the system's C++ compiler (`CXX`, else g++) for this CPU (`-O3 -march=native`;
glibc's vector math library, libmvec, where the kernel includes `vector_math.h`; OpenBLAS from the scipy-openblas32
wheel where it includes `<cblas.h>`), into
`$XDG_CACHE_HOME/conformer/kernels` (default `~/.cache/...`), named by a hash of its sources (its own and the shared
headers), the compiler and the CPU, and moved into place atomically: concurrent processes build it at most once each
and never load half a file. Without a compiler, or when the build fails, `library` says why once and returns None,
and the callers use MindSpore's own kernels.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import os
import platform
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

SOURCES = Path(__file__).resolve().parent
# -z defs: a symbol no library provides fails the build (and the caller falls back), not the first call
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-pthread", "-shared", "-fPIC", "-Wl,-z,defs")
VECTOR_MATH = ("-lmvec", "-lm")


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
