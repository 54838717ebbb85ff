"""The Triton kernels as compiled for an H100 (sm_90), checked in the PTX without a GPU: they compile in every
variant, stream with 16-byte vector loads and stores, and (AdamW) round sqrt and division like torch.

AdamW: addresses read from a table carry no alignment facts, and masks on a run-time size defeat vectorisation;
the kernel restores both (alignment hint, unmasked full chunks). Losing either drops every access to 4 or 2 bytes.
Cross-entropy rows: launched on logits whose row stride and width are multiples of 16 elements (every LLM
vocabulary here), which Triton specializes on, its masked row loads vectorise too.
"""

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

ADAMW = """
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


CROSS_ENTROPY = """
import collections, re, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from lisa_kernels.linear_cross_entropy import _cross_entropy_rows_kernel as kernel

for variant in sys.argv[1:]:
    dtype, softcap, forward, write_grad = variant.split(",")
    constants = dict(SOFTCAP=softcap == "1", FORWARD=forward == "1", WRITE_GRAD=write_grad == "1", BLOCK=4096)
    signature = dict(logits="*" + dtype, labels="*i64", stats="*fp32", losses="*fp32", scale="*fp32", n_cols="i32",
                     row_stride="i32", first_column="i64", softcap="fp32", **{k: "constexpr" for k in constants})
    names = kernel.arg_names
    # What a launch on 16-aligned pointers and sizes that are multiples of 16 specializes on.
    aligned = {(names.index(k),): [["tt.divisibility", 16]]
               for k in ("logits", "labels", "stats", "losses", "scale", "n_cols", "row_stride")}
    source = ASTSource(kernel, signature, {(names.index(k),): v for k, v in constants.items()}, aligned)
    ptx = triton.compile(source, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=8)).asm["ptx"]
    print(dict(collections.Counter(re.findall(r"(ld|st)\\.global\\.v4", ptx))))
"""


def _vector_accesses(script, *variants):
    """{"ld": n, "st": n} 16-byte accesses in the PTX of each variant `script` compiles."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(ROOT)
    result = subprocess.run([sys.executable, "-c", script, *variants], capture_output=True, text=True, env=env,
                            timeout=600)
    if result.returncode != 0 and "ptxas" in result.stderr:
        pytest.skip("Triton's CUDA backend (ptxas) is not available here")
    assert result.returncode == 0, result.stderr[-3000:]
    return [ast.literal_eval(line) for line in result.stdout.strip().splitlines()[-len(variants):]]


def test_full_chunks_use_16_byte_accesses_and_unaligned_tensors_do_not():
    # 4096 elements over 256 threads is 16 per thread: 4 x 16 bytes per fp32 tensor, 2 per bf16 tensor.
    fp32, bf16, unaligned = _vector_accesses(ADAMW, "float32,float32,0,0,1", "bfloat16,float32,0,0,1",
                                             "float32,float32,0,0,0")
    assert fp32 == {"ld": 16, "st": 12}
    assert bf16 == {"ld": 12, "st": 10}
    assert unaligned == {}


def test_every_variant_compiles_for_hopper():
    variants = ["float16,float32,1,0,1", "bfloat16,bfloat16,0,1,1", "bfloat16,float32,1,1,0"]
    assert len(_vector_accesses(ADAMW, *variants)) == len(variants)


def test_cross_entropy_rows_kernel_compiles_for_hopper_with_16_byte_accesses():
    """Forward with gradient (the trainer's path), bf16 and fp32 logits, with and without the soft cap; and the
    forward-only and gradient-only variants. A block of 4,096 logits over 256 threads is 16 per thread: 32 bytes
    (two 16-byte accesses) in bf16, 64 bytes (four) in fp32, per pass over the row (forward, gradient) and per
    store of the gradient."""
    variants = ["bf16,0,1,1", "bf16,1,1,1", "fp32,0,1,1", "bf16,0,1,0", "bf16,0,0,1"]
    bf16, capped, fp32, forward, grad = _vector_accesses(CROSS_ENTROPY, *variants)
    assert bf16 == capped == {"ld": 4, "st": 2}
    assert fp32 == {"ld": 8, "st": 4}
    assert forward == {"ld": 2} and grad == {"ld": 2, "st": 2}
