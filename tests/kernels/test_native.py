"""The optional C++ extension: builds (or explains why not), loads once, can be switched off."""
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

from lisa_kernels import _native

ROOT = Path(__file__).resolve().parents[2]


def python_env(**env):
    return {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", **env}


def run_python(code, timeout=300, **env):
    """Run `code` in a fresh interpreter (the native library loads once per process) and return it."""
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          env=python_env(**env), timeout=timeout)


@pytest.fixture
def ops():
    ops = _native.load()
    if ops is None:
        pytest.skip(f"native extension cannot be built here: {_native.failure_reason()}")
    return ops


def test_build_info_matches_this_torch(ops):
    assert ops.build_info() == f"torch {torch.__version__.split('+')[0]}"
    assert _native.is_available()


@pytest.mark.parametrize("nbytes", [0, 1, 4095, 4096, 1 << 20])
def test_host_alloc_is_page_aligned_and_exact(ops, nbytes):
    t = ops.host_alloc(nbytes, False)
    assert t.dtype == torch.uint8 and t.device.type == "cpu" and t.numel() == nbytes
    if nbytes:
        assert t.data_ptr() % _native.PAGE_SIZE == 0  # the page the Python side sizes chunks by
        t.fill_(7)
        assert int(t[-1]) == 7


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without a GPU")
def test_pinning_without_a_gpu_is_refused_cleanly(ops):
    # Either no libcudart at all, or cudaHostAlloc's own error (no device): an exception, never a crash.
    with pytest.raises(RuntimeError, match="cannot pin memory|cudaHostAlloc"):
        ops.host_alloc(4096, True)
    assert ops.host_alloc(4096, False).numel() == 4096  # and nothing is left broken


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_build_pins(ops):
    t = ops.host_alloc(1 << 20, True)
    assert t.is_pinned()


def test_env_var_forces_fallback_without_warning():
    out = run_python("""
        import warnings
        warnings.simplefilter("error")
        from lisa_kernels import _native
        from lisa_kernels.host_state_bank import HostStateBank
        assert _native.load() is None and not _native.is_available()
        print(HostStateBank().backend, _native.failure_reason())
    """, LISA_KERNELS_NO_NATIVE="1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["fallback", "disabled", "by", "LISA_KERNELS_NO_NATIVE"]


def test_no_compiler_gives_one_clear_warning(tmp_path):
    out = run_python("""
        import warnings
        from lisa_kernels import _native
        from lisa_kernels.host_state_bank import HostStateBank
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            banks = [HostStateBank() for _ in range(3)]
        print(len(caught), banks[0].backend)
        print(caught[0].message)
    """, CXX="/nonexistent/c++", LISA_KERNELS_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    count, backend, message = out.stdout.splitlines()[0].split() + [out.stdout.splitlines()[1]]
    assert (count, backend) == ("1", "fallback")
    assert "no C++ compiler" in message and "/nonexistent/c++" in message


@pytest.mark.skipif(_native._preflight() is not None, reason="no C++ compiler or ninja here")
def test_a_failed_build_falls_back_with_one_warning_naming_the_error(monkeypatch, tmp_path):
    # What a torch without a header the sources need looks like: the compiler's error, not ninja's command line.
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "host_arena.cpp").write_text("#include <torch/not_in_this_torch.h>\n")
    monkeypatch.setattr(_native, "source_dir", lambda: tmp_path / "src")
    monkeypatch.setenv("LISA_KERNELS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(_native, "_ops", _native._UNSET)
    from lisa_kernels.host_state_bank import HostStateBank

    with pytest.warns(RuntimeWarning) as caught:
        banks = [HostStateBank(), HostStateBank()]
    assert len(caught) == 1 and [b.backend for b in banks] == ["fallback", "fallback"]
    message = str(caught[0].message)
    assert "torch/not_in_this_torch.h" in message and "error:" in message and "fallback" in message


def test_import_builds_nothing(tmp_path):
    out = run_python("""
        import lisa_kernels, lisa_kernels.host_state_bank, lisa_kernels._native as n
        print(n._ops is n._UNSET)
    """, LISA_KERNELS_CACHE=str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True" and not any(tmp_path.iterdir())


def test_build_command_prints_where(ops):
    out = run_python("from lisa_kernels.build import main; raise SystemExit(main([]))")
    assert out.returncode == 0, out.stderr
    assert str(_native.build_dir()) in out.stdout


def test_each_source_folder_builds_in_its_own_cache_folder(monkeypatch, tmp_path):
    # Sharing one folder, two checkouts rebuilt each other's library at every first use (the command names the path).
    here = _native.build_dir()
    assert here == _native.build_dir()
    monkeypatch.setattr(_native, "source_dir", lambda: tmp_path)
    other = _native.build_dir()
    assert other != here and other.parent == here.parent


def start_build_then_kill(cache, sig, seconds_into_build):
    """Start `python -m lisa_kernels.build` into `cache` and send it `sig` that long after its build folder appears.

    Only the Python process is signalled, as `kill PID` does: the compiler it started may live on for a while."""
    proc = subprocess.Popen([sys.executable, "-m", "lisa_kernels.build"], env=python_env(LISA_KERNELS_CACHE=str(cache)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while not any(cache.iterdir()) and proc.poll() is None:
            assert time.monotonic() < deadline, "the build never started"
            time.sleep(0.05)
        time.sleep(seconds_into_build)
        proc.send_signal(sig)
        proc.wait(timeout=30)
    finally:
        proc.kill()


@pytest.mark.skipif(_native._preflight() is not None, reason="no C++ compiler or ninja here")
def test_a_build_killed_at_any_moment_leaves_nothing_that_blocks_the_next(tmp_path):
    # A killed first build used to leave torch's `lock` file behind, and every later run hung on it with no output.
    # The build takes ~7 s on a 2-core machine: these moments fall before and while the compiler runs, and a
    # SIGKILL leaves the compiler running beside the next build.
    for sig, seconds in [(signal.SIGKILL, 0.0), (signal.SIGTERM, 2.0), (signal.SIGKILL, 4.0)]:
        start_build_then_kill(tmp_path, sig, seconds)
    out = subprocess.run([sys.executable, "-m", "lisa_kernels.build"], capture_output=True, text=True, timeout=120,
                         env=python_env(LISA_KERNELS_CACHE=str(tmp_path)))
    assert out.returncode == 0, out.stderr
    assert "native host arena ready" in out.stdout


@pytest.mark.skipif(_native._preflight() is not None, reason="no C++ compiler or ninja here")
def test_waiting_on_another_build_says_whose_and_gives_up_with_one_warning(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LISA_KERNELS_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_ops", _native._UNSET)
    monkeypatch.setattr(_native, "_LOCK_NOTICE_S", 0.2)
    monkeypatch.setattr(_native, "_LOCK_LIMIT_S", 0.6)
    _native.build_dir().mkdir(parents=True)
    with _native._build_lock(_native.build_dir() / "build.lock"):  # a build in progress (this process's own)
        with pytest.warns(RuntimeWarning) as caught:
            assert _native.load() is None
    assert len(caught) == 1
    whose = f"pid {os.getpid()}"
    assert whose in capsys.readouterr().err and whose in str(caught[0].message)
    assert "gave up after" in _native.failure_reason()
