"""LM-head loss: the plain loss (whole logits) vs `lisa_kernels.linear_cross_entropy` (one tile at a time).

The chunked loss runs with its PyTorch path and, on a GPU, with its Triton kernel between the matmuls. All compute the summed cross-entropy of `hidden @ weight.T` and its backward, on the same inputs in the same run.
Reported: peak memory the loss allocates above its inputs (on CUDA `max_memory_allocated`; on CPU the peak of
torch's profiler memory timeline), time (median with p20/p80), and the two losses' difference. The head's
temporaries do not depend on the hidden size (only the weight's gradient does), so on CPU a hidden size of 64
shows the memory of a 128k-vocabulary head in seconds; on a GPU the default is Llama-3-8B's head (4096, bf16).

    python -m benchmarks.bench_linear_cross_entropy [--tokens 1024] [--vocab 128256] [--hidden N] [--dtype D]
"""
from __future__ import annotations

import argparse
import functools
import sys

import torch

from benchmarks.common import default_device, environment, print_table, synchronize, time_fn, write_results
from lisa_kernels.linear_cross_entropy import (
    DEFAULT_TILE_ELEMENTS,
    kernel_available,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = {"plain (whole logits)": linear_cross_entropy_reference, "chunked": linear_cross_entropy,
           "chunked, Triton": functools.partial(linear_cross_entropy, kernel=True)}


def loss_and_backward(method, hidden, weight, labels):
    hidden.grad = weight.grad = None
    loss = method(hidden, weight, labels)
    loss.backward()
    return loss.detach()


def peak_bytes(method, hidden, weight, labels, device) -> int:
    """Peak bytes allocated while one loss and its backward run, above what was allocated before."""
    if device.type == "cuda":
        synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        loss_and_backward(method, hidden, weight, labels)
        synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    from torch.profiler import ProfilerActivity, profile
    from torch.profiler._memory_profiler import MemoryProfileTimeline

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        loss_and_backward(method, hidden, weight, labels)
    _, sizes = MemoryProfileTimeline(prof._memory_profile())._coalesce_timeline("cpu")
    return max(sum(s) for s in sizes)


def main(argv: list[str] | None = None) -> int:
    device = default_device()
    gpu = device.type == "cuda"
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--vocab", type=int, default=128256, help="Llama-3's vocabulary")
    p.add_argument("--hidden", type=int, default=4096 if gpu else 64)
    p.add_argument("--dtype", choices=DTYPES, default="bfloat16" if gpu else "float32")
    p.add_argument("--repeats", type=int, default=10 if gpu else 1)
    p.add_argument("--results-dir", help="where the JSON goes (default benchmarks/results)")
    args = p.parse_args(argv)

    gen = torch.Generator(device=device).manual_seed(0)
    dtype = DTYPES[args.dtype]
    hidden = torch.randn(args.tokens, args.hidden, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(args.vocab, args.hidden, device=device, generator=gen) / args.hidden**0.5).to(dtype)
    weight.requires_grad_()
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)

    rows, losses = [], {}
    for name, method in METHODS.items():
        if name == "chunked, Triton" and not (gpu and kernel_available(device)):
            continue  # Triton's interpreter on CPU says nothing about speed or memory
        losses[name] = float(loss_and_backward(method, hidden, weight, labels))
        peak = peak_bytes(method, hidden, weight, labels, device)
        t = time_fn(lambda: loss_and_backward(method, hidden, weight, labels), warmup=1 if gpu else 0,
                    repeats=args.repeats, device=device)
        rows.append({"method": name, "peak_MiB": peak / 2**20, "median_ms": t["median_ms"], "p20_ms": t["p20_ms"],
                     "p80_ms": t["p80_ms"], "loss": losses[name]})
    logits_bytes = args.tokens * args.vocab * 4
    shape = f"{args.tokens} tokens x {args.vocab} vocab x {args.hidden} hidden, {args.dtype}"
    print_table(rows, title=f"LM-head loss + backward, {shape}, on {environment(device)['device']} "
                            f"(fp32 logits: {logits_bytes / 2**20:.0f} MiB)")
    path = write_results("bench_linear_cross_entropy", {
        "tokens": args.tokens, "vocab": args.vocab, "hidden": args.hidden, "dtype": args.dtype,
        "tile_elements": DEFAULT_TILE_ELEMENTS, "fp32_logits_bytes": logits_bytes, "rows": rows,
        "loss_difference": max(abs(v - losses["plain (whole logits)"]) for v in losses.values()),
    }, device, results_dir=args.results_dir)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
