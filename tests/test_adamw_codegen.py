"""The compiled kernel streams with 16-byte vector loads and stores (checked in the PTX, no GPU needed).

Addresses read from a table carry no alignment facts, and masks on a run-time size defeat vectorisation; the
kernel restores both (alignment hint, unmasked full chunks). Losing either drops every access to 4 or 2 bytes.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

COMPILE = """
import collections, re, sys
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lisa_kernels.adamw import _adamw_kernel

param, aligned = getattr(tl, sys.argv[1]), sys.argv[2] == "1"
constants = dict(PARAM=param, GRAD=param, STATE=tl.float32, AMSGRAD=False, STOCHASTIC_ROUNDING=False,
                 ALIGNED=aligned, BLOCK=4096)
signature = dict(table="*i64", hyper="*fp32", chunks="*i64", seed="i32", **{k: "constexpr" for k in constants})
names = _adamw_kernel.arg_names
source = ASTSource(_adamw_kernel, signature, {(names.index(k),): v for k, v in constants.items()})
kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
print(dict(collections.Counter(re.findall(r"(ld|st)\\.global\\.v4", kernel.asm["ptx"]))))
"""


def _vector_accesses(param_dtype, aligned):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", COMPILE, param_dtype, str(int(aligned))], capture_output=True,
                            text=True, env=env, timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr:
        pytest.skip("Triton's CUDA backend (ptxas) is not available here")
    assert result.returncode == 0, result.stderr[-3000:]
    return ast.literal_eval(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("param_dtype,loads,stores", [("float32", 16, 12), ("bfloat16", 12, 10)])
def test_full_chunks_use_16_byte_accesses(param_dtype, loads, stores):
    # 4096 elements over 256 threads is 16 per thread: 4 x 16 bytes per fp32 tensor, 2 per bf16 tensor.
    assert _vector_accesses(param_dtype, aligned=True) == {"ld": loads, "st": stores}


def test_unaligned_tensors_fall_back_to_narrow_accesses():
    assert _vector_accesses("float32", aligned=False) == {}
