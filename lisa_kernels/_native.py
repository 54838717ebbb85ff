"""The optional C++ extension (`csrc/host_arena.cpp`): built at first use, cached, and never required.

`load()` returns the `torch.ops.lisa_kernels` namespace, or `None` after ONE warning that says what failed
(no C++ compiler, no ninja, a build error, a library built for another torch). `LISA_KERNELS_NO_NATIVE=1` forces
`None` without a warning. Importing this module compiles nothing and touches no GPU.

The library needs only a host C++ compiler and ninja: it finds the CUDA runtime at run time, so the same build
serves GPU and CPU-only machines and no CUDA toolkit is needed. Builds live in `$LISA_KERNELS_CACHE` (default
`~/.cache/lisa_kernels`), one folder per torch version, Python version and source folder, so upgrading torch builds
afresh instead of loading a library made for another ABI.
A file lock serialises concurrent builds (several ranks of one job start at once); the loser of the race finds
the finished library and only loads it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import warnings
from pathlib import Path

import torch

_EXT_NAME = "lisa_kernels_host_arena"
_SOURCES = ("host_arena.cpp",)
_NO_NATIVE_ENV = "LISA_KERNELS_NO_NATIVE"
_CACHE_ENV = "LISA_KERNELS_CACHE"

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

    The source folder is in the name because the compile command names it: two checkouts (or a checkout and an
    installed copy) sharing one folder made ninja rebuild the library, ~10 s, at every first use by the other.
    """
    try:
        where = str(source_dir())
    except FileNotFoundError:
        where = ""
    checkout = hashlib.sha256(where.encode()).hexdigest()[:8]
    tag = f"torch{torch.__version__.replace('+', '_')}-py{sys.version_info[0]}{sys.version_info[1]}-{checkout}"
    return cache_root() / tag


def source_dir() -> Path:
    """`csrc/` of a source checkout, or the installed `lisa_kernels.csrc` package."""
    here = Path(__file__).resolve().parent
    candidates = [here.parent / "csrc"]
    try:
        from importlib import resources

        candidates.insert(0, Path(str(resources.files("lisa_kernels.csrc"))))
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


def _build_and_load(verbose: bool = False):
    import filelock
    from torch.utils import cpp_extension

    src = source_dir()
    out = build_dir()
    out.mkdir(parents=True, exist_ok=True)
    with filelock.FileLock(str(out / "build.lock")):
        cpp_extension.load(
            name=_EXT_NAME,
            sources=[str(src / s) for s in _SOURCES],
            extra_cflags=["-O2"],
            extra_ldflags=["-ldl"],
            build_directory=str(out),
            with_cuda=False,  # the CUDA runtime is dlopen-ed at run time: no toolkit needed to build
            is_python_module=False,
            verbose=verbose,
        )
    ops = torch.ops.lisa_kernels
    built_for = ops.build_info()
    expected = f"torch {torch.__version__.split('+')[0]}"
    if built_for != expected:
        raise _StaleBuild(f"built for {built_for}, you have torch {torch.__version__} "
                          f"(delete {out} to rebuild)")
    return ops


class _StaleBuild(RuntimeError):
    pass


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
        except _StaleBuild as e:
            reason = str(e)
        except Exception as e:  # a compiler error, a missing header, a library that will not load
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            reason = f"build or load failed in {build_dir()}: {type(e).__name__}: {first}"
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
