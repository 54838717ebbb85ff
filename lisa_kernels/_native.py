"""The optional C++ extension (`csrc/host_arena.cpp`): built at first use, cached, and never required.

`load()` returns the `torch.ops.lisa_kernels` namespace, or `None` after ONE warning that says what failed
(no C++ compiler, no ninja, a build error, a library built for another torch). `LISA_KERNELS_NO_NATIVE=1` forces
`None` without a warning. Importing this module compiles nothing and touches no GPU.

The library needs only a host C++ compiler and ninja: it finds the CUDA runtime at run time, so the same build
serves GPU and CPU-only machines and no CUDA toolkit is needed. Builds live in `$LISA_KERNELS_CACHE` (default
`~/.cache/lisa_kernels`), one folder per torch version, Python version and source folder, so upgrading torch builds
afresh instead of loading a library made for another ABI.

A build can be killed at any moment without harming the next one. An OS lock (`flock`, which the kernel releases
when its holder exits, however it exits) serialises builds: several ranks of one job start at once, and the loser
of the race finds the finished library and only loads it. Each build compiles in a private folder and moves the
finished library into place in one rename, so a killed build (or the compiler it leaves running) never leaves a
half-written library or a lock file behind. A process that waits on another's build for longer than
`_LOCK_NOTICE_S` says whose build it waits for; after `_LOCK_LIMIT_S` it gives up and falls back.
"""
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

_EXT_NAME = "lisa_kernels_host_arena"
_SOURCES = ("host_arena.cpp",)
_NO_NATIVE_ENV = "LISA_KERNELS_NO_NATIVE"
_CACHE_ENV = "LISA_KERNELS_CACHE"
PAGE_SIZE = mmap.PAGESIZE  # the OS's page, as host_arena.cpp sizes and aligns chunks: 4 KiB on x86-64, up to 64 KiB
_CFLAGS = ("-O2",)
_LDFLAGS = ("-ldl",)
_LOCK_NOTICE_S = 30.0   # a build takes ~10 s on a busy 2-core machine: after 3x that, say whose build we wait for
_LOCK_LIMIT_S = 600.0   # then fall back rather than stall a run forever behind a build that hangs

_UNSET = object()
_ops = _UNSET          # the loaded op namespace, None after a failure, _UNSET before the first try
_failure: str | None = None


def disabled_by_env() -> bool:
    return os.environ.get(_NO_NATIVE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def cache_root() -> Path:
    root = os.environ.get(_CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "lisa_kernels"


def build_dir() -> Path:
    """One folder per torch version, Python version and source folder.

    The source folder is in the name so that two checkouts (or a checkout and an installed copy) never share a
    folder: each replaces its library when its own sources change, and would otherwise delete the other's.
    """
    try:
        where = str(source_dir())
    except FileNotFoundError:
        where = ""
    checkout = hashlib.sha256(where.encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{checkout}"
    return cache_root() / tag


def source_dir() -> Path:
    """`csrc/` beside this package in a source checkout, else the installed `lisa_kernels.csrc` package. The
    checkout comes first: with an editable install of another checkout, `lisa_kernels.csrc` resolves to that one."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "csrc"]
    try:
        from importlib import resources

        candidates.append(Path(str(resources.files("lisa_kernels.csrc"))))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    for path in candidates:
        if all((path / s).is_file() for s in _SOURCES):
            return path
    raise FileNotFoundError(f"C++ sources {_SOURCES} not found in any of {[str(c) for c in candidates]}")


def _preflight() -> str | None:
    """A plain-words reason the build cannot work, found before spending a minute in the compiler."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        return f"no C++ compiler ({cxx!r} not found on PATH; set CXX or install g++)"
    from torch.utils import cpp_extension

    try:
        cpp_extension.verify_ninja_availability()
    except RuntimeError:
        return "ninja not found (pip install ninja)"
    return None


def _library_name(src: Path) -> str:
    """The library's file name, which changes whenever its sources or build flags do."""
    digest = hashlib.sha256(repr((_CFLAGS, _LDFLAGS)).encode())
    for path in sorted([*src.glob("*.cpp"), *src.glob("*.h")]):
        digest.update(path.name.encode() + path.read_bytes())
    return f"{_EXT_NAME}-{digest.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _build_lock(path: Path):
    """Hold an exclusive `flock` on `path`; the file keeps the holder's pid so that waiters can name it."""
    import fcntl

    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        started = time.monotonic()
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                waited = time.monotonic() - started
                holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
                if waited >= _LOCK_LIMIT_S:
                    raise _LockTimeout(f"gave up after {waited:.0f} s waiting for the build of pid {holder} "
                                       f"in {path.parent} (lock file {path.name})")
                if waited >= _LOCK_NOTICE_S and not told:
                    print(f"lisa_kernels: waiting for pid {holder} to finish building the native host arena in "
                          f"{path.parent} ({waited:.0f} s so far; falling back after {_LOCK_LIMIT_S:.0f} s)",
                          file=sys.stderr, flush=True)
                    told = True
                time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock


def _build_and_load(verbose: bool = False):
    from torch.utils import cpp_extension

    src = source_dir()
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    library = out / _library_name(src)
    with _build_lock(out / "build.lock"):
        if library.is_file():
            torch.ops.load_library(str(library))
        else:
            # Holding the lock, every other build folder and library here is a leftover: a killed build's, or one
            # made from older sources.
            for folder in out.glob("building-*"):
                shutil.rmtree(folder, ignore_errors=True)  # a compiler a killed build left running may still write
            for old_library in out.glob(f"{_EXT_NAME}-*.so"):
                old_library.unlink()
            work = Path(tempfile.mkdtemp(prefix="building-", dir=out))
            cpp_extension.load(  # builds in `work` and loads the library from there
                name=_EXT_NAME,
                sources=[str(src / s) for s in _SOURCES],
                extra_cflags=list(_CFLAGS),
                extra_ldflags=list(_LDFLAGS),
                build_directory=str(work),
                with_cuda=False,  # the CUDA runtime is dlopen-ed at run time: no toolkit needed to build
                is_python_module=False,
                verbose=verbose,
            )
            built, = work.glob("*.so")  # named `{_EXT_NAME}_v1.so` and so on after an earlier build in this process
            os.replace(built, library)
            shutil.rmtree(work, ignore_errors=True)
    ops = torch.ops.lisa_kernels
    built_for = ops.build_info()
    expected = f"torch {torch.__version__.split('+')[0]}"
    if built_for != expected:
        raise _StaleBuild(f"built for {built_for}, you have torch {torch.__version__} "
                          f"(delete {out} to rebuild)")
    return ops


class _LockTimeout(RuntimeError):
    pass


class _StaleBuild(RuntimeError):
    pass


def _first_error(text: str) -> str:
    """The compiler's first `error:` line out of a build failure's output, else its first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    return (errors or lines or ["(no message)"])[0]


def load(verbose: bool = False):
    """The native ops, building them on first call; `None` (after one warning) when they cannot be had."""
    global _ops, _failure
    if _ops is not _UNSET:
        return _ops
    if disabled_by_env():
        _ops, _failure = None, f"disabled by {_NO_NATIVE_ENV}"
        return None
    reason = _preflight()
    if reason is None:
        try:
            _ops = _build_and_load(verbose=verbose)
            return _ops
        except (_StaleBuild, _LockTimeout) as e:
            reason = str(e)
        except Exception as e:  # a compiler error, a missing header, a library that will not load
            reason = f"build or load failed in {build_dir()}: {type(e).__name__}: {_first_error(str(e))}"
    _ops, _failure = None, reason
    warnings.warn(f"lisa_kernels: native host arena unavailable ({reason}); using the pure-PyTorch fallback, "
                  f"which behaves the same but pins memory through PyTorch's power-of-two caching allocator.",
                  RuntimeWarning, stacklevel=2)
    return None


def is_available() -> bool:
    """True when the native extension is (or can now be) built and loaded; builds it on first call."""
    return load() is not None


def failure_reason() -> str | None:
    """Why `load()` returned None, or None when it did not (or was not called yet)."""
    return _failure
