"""The compiled kernel streams with 16-byte vector loads and stores and rounds sqrt and division like torch
(checked in the PTX, no GPU needed).

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

for variant in sys.argv[1:]:
    param, state, amsgrad, stochastic, aligned = variant.split(",")
    constants = dict(PARAM=getattr(tl, param), GRAD=getattr(tl, param), STATE=getattr(tl, state),
                     AMSGRAD=amsgrad == "1", STOCHASTIC_ROUNDING=stochastic == "1", ALIGNED=aligned == "1",
                     BLOCK=4096)
    signature = dict(table="*i64", hyper="*fp32", chunks="*i64", seed="i32", **{k: "constexpr" for k in constants})
    names = _adamw_kernel.arg_names
    source = ASTSource(_adamw_kernel, signature, {(names.index(k),): v for k, v in constants.items()})
    kernel = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8))
    ptx = kernel.asm["ptx"]
    counts = collections.Counter(re.findall(r"(ld|st)\\.global\\.v4", ptx))
    counts.update("approximate math" for _ in re.findall(r"(?:sqrt|div|rcp)\\.(?:approx|full)", ptx))
    print(dict(counts))
"""


def _vector_accesses(*variants):
    """{"ld": n, "st": n} 16-byte accesses in the PTX of each variant "param,state,amsgrad,stochastic,aligned"."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", COMPILE, *variants], capture_output=True, text=True, env=env,
                            timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr:
        pytest.skip("Triton's CUDA backend (ptxas) is not available here")
    assert result.returncode == 0, result.stderr[-3000:]
    return [ast.literal_eval(line) for line in result.stdout.strip().splitlines()[-len(variants):]]


def test_full_chunks_use_16_byte_accesses_and_unaligned_tensors_do_not():
    # 4096 elements over 256 threads is 16 per thread: 4 x 16 bytes per fp32 tensor, 2 per bf16 tensor.
    fp32, bf16, unaligned = _vector_accesses("float32,float32,0,0,1", "bfloat16,float32,0,0,1",
                                             "float32,float32,0,0,0")
    assert fp32 == {"ld": 16, "st": 12}
    assert bf16 == {"ld": 12, "st": 10}
    assert unaligned == {}


def test_every_variant_compiles_for_hopper():
    variants = ["float16,float32,1,0,1", "bfloat16,bfloat16,0,1,1", "bfloat16,float32,1,1,0"]
    assert len(_vector_accesses(*variants)) == len(variants)
