"""Compile the native kernels on first use (torch.utils.cpp_extension + ninja), once per machine.

The build lives under the modelpress cache (`$MODELPRESS_CACHE/kernels` or `~/.cache/modelpress/kernels`), in a
folder named after a hash of the sources, torch and Python versions, so a new version builds next to the old one.
A file lock keeps concurrent processes from building the same folder at once (the second one waits, then loads).
Without a compiler, without ninja, or when the build fails, `load()` warns once and returns None: every layer then
runs torch's kernels or the reference path. `MODELPRESS_NATIVE=0` skips the build altogether.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import time
import warnings
from functools import lru_cache
from pathlib import Path

import torch

CSRC = Path(__file__).with_name("csrc")
SOURCES = ("bind.cpp", "cpu.cpp", "actq.cpp", "rows.cpp", "layout.cpp", "fp8.cpp", "isa_avx512_vnni.cpp", "isa_avx512.cpp", "isa_avx2_vnni.cpp", "isa_avx2.cpp", "isa_scalar.cpp")
HEADERS = ("common.h", "cpu.h", "gemm_impl.h", "dw_impl.h", "x86_traits.h", "isa_x86.inc")
# -fopenmp: torch's CPU wheels run at::parallel_for on OpenMP; compiled without it the pragma is dropped and every
# parallel_for in the kernels runs on one thread (measured: the same time with 1 and 2 threads). Not on macOS,
# whose clang has no OpenMP by default (there the kernels stay single-threaded rather than fail to build).
# -fno-trapping-math: lets the compiler vectorize loops with clamps (a conditional float operation could raise an
# FP exception nobody reads; the values computed are the same). Without it the activation fake quantization's
# loops stayed scalar in the AVX2 and baseline builds (0.7 ns per value instead of ~0.1).
# -ffp-contract=off: the compiler never fuses a * b + c into one rounding (GCC does by default where the target has
# FMA: every AArch64 build, and the x86 files compiled for AVX2 / AVX-512), so plain loops round as the reference's
# separate multiply and add do (an ARM build's int8 bags differed from torch's in the last bit); the kernels that
# want an FMA write it as an intrinsic
FLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-ffp-contract=off", "-DNDEBUG"] + \
    (["-fopenmp"] if sys.platform.startswith("linux") else [])
# MODELPRESS_SANITIZE=1: a checking build for developers and CI (.ci/run), in its own folder (the flags are part of
# the hash): AddressSanitizer (a read or write past a buffer, a use after free) and UndefinedBehaviorSanitizer
# (misaligned accesses, signed overflow, bad shifts), each report fatal. Python must then be started with the
# sanitizer runtime preloaded: LD_PRELOAD="$(gcc -print-file-name=libasan.so) $(gcc -print-file-name=libstdc++.so.6)"
# (libstdc++ too, or ASan's exception interceptor finds no __cxa_throw) and ASAN_OPTIONS=detect_leaks=0 (Python
# keeps objects alive to the end).
SANITIZE = ["-O1", "-g", "-fno-omit-frame-pointer", "-fsanitize=address,undefined", "-fno-sanitize-recover=all"]


def flags() -> list[str]:
    return FLAGS + SANITIZE if os.environ.get("MODELPRESS_SANITIZE", "0").strip() == "1" else FLAGS


def cache_root() -> Path:
    """`$MODELPRESS_CACHE/kernels`, else `~/.cache/modelpress/kernels`."""
    env = os.environ.get("MODELPRESS_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "modelpress") / "kernels"


def source_hash() -> str:
    h = hashlib.sha256()
    for name in SOURCES + HEADERS:
        h.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    # the sources' own folder too: ninja's build file names them by absolute path, so two checkouts sharing one
    # build folder would rebuild it in turn
    h.update(" ".join(flags() + [torch.__version__, sys.version, platform.machine(), str(CSRC.resolve())]).encode())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock held while building (released by the OS if the process dies). Yields True when it is a
    real lock, False where there is none (Windows: torch's own FileBaton then guards the ninja build alone)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        try:
            import fcntl
        except ImportError:
            yield False
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield True
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def clear_stale_baton(build_dir: Path) -> bool:
    """Remove torch's build baton (`<build_dir>/lock`) left behind by a build that was killed: cpp_extension waits
    for it to disappear, forever. Only called under our own exclusive lock, so no other build of this folder runs
    and a baton found here is stale. True when one was removed."""
    baton = build_dir / "lock"
    try:
        baton.unlink()
    except FileNotFoundError:
        return False
    warnings.warn(f"modelpress: removed a stale build lock left by an interrupted kernel build ({baton})",
                  RuntimeWarning, stacklevel=3)
    return True


@contextlib.contextmanager
def _ninja_on_path():
    """torch looks for `ninja` on PATH; the PyPI package may sit in a venv whose bin is not on it."""
    old = os.environ.get("PATH", "")
    try:
        import ninja  # the PyPI package (a dependency of modelpress)

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + old
    except (ImportError, AttributeError):
        pass
    bindir = str(Path(sys.executable).parent)
    if bindir not in os.environ["PATH"].split(os.pathsep):
        os.environ["PATH"] = os.environ["PATH"] + os.pathsep + bindir
    try:
        yield
    finally:
        os.environ["PATH"] = old


def _compile(build_dir: Path):
    from torch.utils import cpp_extension

    with _ninja_on_path():
        cpp_extension.verify_ninja_availability()
        return cpp_extension.load(name="modelpress_kernels_" + build_dir.name.replace("-", "_"), sources=[str(CSRC / s) for s in SOURCES],
                                  extra_cflags=flags(), extra_ldflags=[f for f in flags() if f == "-fopenmp" or f.startswith("-fsanitize")],
                                  extra_include_paths=[str(CSRC)],
                                  build_directory=str(build_dir), verbose=False)


@lru_cache(maxsize=None)
def load():
    """The compiled extension module, or None (after one warning) when it cannot be built or is disabled."""
    if os.environ.get("MODELPRESS_NATIVE", "1").strip() == "0":
        return None
    root = cache_root()
    build_dir = root / f"build-{source_hash()}"
    t0 = time.perf_counter()
    try:
        build_dir.mkdir(parents=True, exist_ok=True)
        with _file_lock(root / f"build-{build_dir.name}.lock") as locked:
            if locked:
                clear_stale_baton(build_dir)
            module = _compile(build_dir)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, a compile error: fall back, never crash
        msg = " ".join(str(e).split())
        msg = msg if len(msg) < 400 else msg[:150] + " ... " + msg[-250:]
        warnings.warn(f"modelpress: native CPU kernels unavailable ({type(e).__name__}: {msg}); quantized layers use "
                      "torch's kernels or the reference path. Install a C++ compiler and `pip install ninja` to get "
                      "them, or set MODELPRESS_NATIVE=0 to silence this.", RuntimeWarning, stacklevel=3)
        return None
    module.build_seconds = time.perf_counter() - t0
    return module
