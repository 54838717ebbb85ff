"""FusedAdamW against torch.optim.AdamW (foreach and fused) on the same tensors, side by side in one run.

Sets: a LISA active set of Llama-2-7B shape (embedding, LM head, final norm and 2 decoder layers: ~666M
elements) and a many-small-tensors set. Precisions: fp32 everywhere, and bf16 params and grads (ours with fp32
moments; torch's AdamW keeps moments in the param dtype, so its bf16 rows move 14 bytes an element, ours 22).
GB/s counts the fewest bytes each configuration must move per element; % is of the device-to-device copy
bandwidth measured in the same run. The methods' steps are timed interleaved (one step of each in turn), so a
busy machine slows them alike. On CPU the shapes shrink so the run takes seconds, and the targets are read as
time ratios: FusedAdamW fp32 <= 1.10x torch fused=True; FusedAdamW bf16 params with fp32 moments <= 1.10x torch
foreach on bf16 (its moments bf16).

    python -m benchmarks.bench_adamw            # prints a table, writes benchmarks/results/bench_adamw-<device>.json
    python -m benchmarks.bench_adamw --threads 1 --repeats 40   # on a busy CPU
"""

import argparse

import torch
from benchmarks.common import (Timer, default_device, environment, measure_copy_bandwidth, print_table, summarize,
                               synchronize, write_results)

from lisa_kernels import FusedAdamW

# Llama-2-7B: hidden 4096, MLP 11008, vocab 32000.
LLAMA_7B = dict(hidden=4096, intermediate=11008, vocab=32000)
CPU_SHAPES = dict(hidden=256, intermediate=688, vocab=2000)


def lisa_active_set(hidden, intermediate, vocab, layers=2):
    """Embedding, LM head, final norm and `layers` decoder layers of a Llama model."""
    layer = [(hidden, hidden)] * 4 + [(intermediate, hidden)] * 2 + [(hidden, intermediate)] + [(hidden,)] * 2
    return [(vocab, hidden), (vocab, hidden), (hidden,)] + layer * layers


def many_small_set(count, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(int(n),) for n in torch.randint(1_000, 65_000, (count,), generator=g)]


def bytes_per_element(param_dtype, state_dtype):
    """Read param, grad and both moments; write param and both moments."""
    p, s = param_dtype.itemsize, state_dtype.itemsize
    return 2 * p + p + 2 * s + 2 * s


def optimizers(params, param_dtype):
    ours = [("FusedAdamW (ours)", lambda: FusedAdamW(params, lr=1e-4), torch.float32)]
    torch_rows = [("torch AdamW foreach", dict(foreach=True)), ("torch AdamW fused", dict(fused=True))]
    return ours + [(name, lambda kw=kw: torch.optim.AdamW(params, lr=1e-4, **kw), param_dtype)
                   for name, kw in torch_rows]


def interleaved_times(steps: list, warmup: int, repeats: int, device) -> list[dict]:
    """Median / p20 / p80 of each function, timed one call of each in turn."""
    for _ in range(warmup):
        for step in steps:
            step()
    synchronize(device)
    times = [[] for _ in steps]
    for _ in range(repeats):
        for step, ts in zip(steps, times):
            with Timer(device) as t:
                step()
            ts.append(t.elapsed_ms())
    return [summarize(ts) for ts in times]


def bench_set(name, shapes, param_dtype, device, copy_gbps, repeats):
    g = torch.Generator(device=device).manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, device=device, generator=g).to(param_dtype)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, device=device, generator=g).mul_(1e-3).to(param_dtype)
    elements = sum(p.numel() for p in params)
    methods = optimizers(params, param_dtype)
    steps = [make().step for _, make, _ in methods]
    rows = []
    for (method, _, state_dtype), timing in zip(methods, interleaved_times(steps, 3, repeats, device)):
        gbps = elements * bytes_per_element(param_dtype, state_dtype) / (timing["median_ms"] * 1e-3) / 1e9
        rows.append(dict(set=name, params=str(param_dtype).removeprefix("torch."),
                         moments=str(state_dtype).removeprefix("torch."), method=method, tensors=len(params),
                         elements=elements, **timing, gbps=gbps, pct_copy_bw=100 * gbps / copy_gbps))
    del steps
    if device.type == "cuda":
        torch.cuda.empty_cache()
    by_method = {r["method"]: r["median_ms"] for r in rows}
    for r in rows:
        r["ours_speedup"] = r["median_ms"] / by_method["FusedAdamW (ours)"]
    return rows


def targets(rows, on_gpu):
    """The goals, read off this run's rows: speedups on a GPU, time ratios (ours / torch) on CPU."""
    find = {(r["set"], r["params"], r["method"]): r for r in rows}
    if on_gpu:
        ours_fp32 = find[("lisa-7b", "float32", "FusedAdamW (ours)")]
        return {
            "7b_fp32_pct_copy_bw >= 90": ours_fp32["pct_copy_bw"],
            "7b_fp32_speedup_vs_torch_fused >= 1.1": find[("lisa-7b", "float32", "torch AdamW fused")]["ours_speedup"],
            "7b_bf16_speedup_vs_torch_foreach >= 1.3":
                find[("lisa-7b", "bfloat16", "torch AdamW foreach")]["ours_speedup"],
        }
    result = {}
    for set_name in sorted({r["set"] for r in rows}):
        ours = {dtype: find[(set_name, dtype, "FusedAdamW (ours)")] for dtype in ("float32", "bfloat16")}
        versus = {"float32": find[(set_name, "float32", "torch AdamW fused")],
                  "bfloat16": find[(set_name, "bfloat16", "torch AdamW foreach")]}
        names = {"float32": "fp32_time_vs_torch_fused", "bfloat16": "bf16_fp32_moments_time_vs_torch_foreach_bf16"}
        # The median is the headline; p20 is steadier when other jobs share the machine.
        for dtype, name in names.items():
            for stat in ("median_ms", "p20_ms"):
                result[f"{set_name}_{name}_{stat.removesuffix('_ms')} <= 1.10"] = (
                    ours[dtype][stat] / versus[dtype][stat])
    return result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--small-tensors", type=int, default=None, help="tensors in the many-small set")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch CPU threads for every method (default: torch's); 1 is steadier on a busy machine")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = default_device()
    on_gpu = device.type == "cuda"
    shapes = LLAMA_7B if on_gpu else CPU_SHAPES
    small = args.small_tensors or (2000 if on_gpu else 200)
    copy = measure_copy_bandwidth(device)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += bench_set("lisa-7b" if on_gpu else "lisa-7b-shape/16", lisa_active_set(**shapes), dtype, device,
                          copy["gbps"], args.repeats)
        rows += bench_set(f"many-small-{small}", many_small_set(small), dtype, device, copy["gbps"], args.repeats)
    columns = ["set", "params", "moments", "method", "median_ms", "p20_ms", "p80_ms", "gbps", "pct_copy_bw",
               "ours_speedup"]
    print(f"device: {environment(device)['device']}; copy bandwidth {copy['gbps']:.1f} GB/s (read + write)")
    print_table(rows, columns)
    result = dict(copy_bandwidth=copy, threads=torch.get_num_threads(), rows=rows, targets=targets(rows, on_gpu))
    for goal, value in result["targets"].items():
        print(f"target {goal}: {value:.3g}")
    print(f"wrote {write_results('bench_adamw', result, device)}")


if __name__ == "__main__":
    main()
