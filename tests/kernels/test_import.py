"""Importing the packages touches no GPU and compiles nothing (so collection works on any machine)."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

PROBE = """
import torch, torch.utils.cpp_extension

def forbidden(what):
    def fail(*args, **kwargs):
        raise AssertionError(what + " at import time")
    return fail

torch.cuda._lazy_init = forbidden("CUDA initialised")
torch.utils.cpp_extension.load = forbidden("C++ extension built")
try:
    import triton.compiler
    triton.compiler.compile = forbidden("Triton kernel compiled")
except ImportError:
    pass

import importlib, pkgutil
for package in ("lisa_kernels", "lisa_trainer"):
    module = importlib.import_module(package)
    for info in pkgutil.iter_modules(module.__path__):
        importlib.import_module(package + "." + info.name)
print("imported")
"""


def test_import_touches_no_gpu_and_compiles_nothing():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "python_api"),
                                                       os.environ.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "imported" in result.stdout
