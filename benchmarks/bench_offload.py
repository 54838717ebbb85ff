"""HostStateBank: park/unpark bandwidth, and the stall a LISA switch costs a training step.

1. Bandwidth. One decoder layer's Adam moments (two fp32 tensors per weight matrix, LLaMA-shaped and scaled by
   --layer-params) are parked (device -> host) and unparked (host -> device) through the bank. The same bytes
   copied as one tensor to and from pinned memory (`torch.empty(pin_memory=True)`) and pageable memory, in the
   same run, are the yardsticks: the target is >= 80% of the pinned figure.
2. Switch stall. A simulated training step is a matmul loop of known length (calibrated to --step-ms) followed
   by an "optimizer step" that reads the active layer's moments. At a LISA switch the outgoing layer's state is
   parked and the incoming layer's state comes back:
   - without prefetch, `restore` runs when the optimizer step needs the state (what `step()` does on its own),
     so the whole copy is exposed;
   - with prefetch, `prefetch` is called at the start of the step before (LisaConfig.prefetch_steps=1) and the
     copy overlaps that step's compute.
   The stall is (switch step - ordinary step); the target with prefetch is <= 5% of one step.

Without a GPU every copy is a synchronous memcpy and prefetch cannot hide anything; the CPU run only checks that
the benchmark works (small sizes). Results: benchmarks/results/bench_offload-<device>.json
(or the folder `$LISA_BENCH_RESULTS` names).

    python -m benchmarks.bench_offload [--layer-params 202e6] [--step-ms 50] [--backend auto|native|fallback]
"""
from __future__ import annotations

import argparse
import sys

import torch

from benchmarks.common import (Timer, default_device, environment, print_table, summarize, synchronize, time_fn,
                               write_results)
from lisa_kernels.host_state_bank import HostStateBank

# One LLaMA-7B decoder layer: q, k, v, o (4096 x 4096) and gate, up, down (4096 x 11008): 202M parameters.
_LLAMA_LAYER = [(4096, 4096)] * 4 + [(11008, 4096), (11008, 4096), (4096, 11008)]


def layer_state(n_params: float, device: torch.device, seed: int = 0) -> dict[str, torch.Tensor]:
    """exp_avg / exp_avg_sq for a LLaMA-shaped layer scaled to ~n_params parameters."""
    scale = (n_params / sum(r * c for r, c in _LLAMA_LAYER)) ** 0.5
    g = torch.Generator(device=device).manual_seed(seed)
    state = {}
    for i, (rows, cols) in enumerate(_LLAMA_LAYER):
        shape = (max(1, round(rows * scale)), max(1, round(cols * scale)))
        for key in ("exp_avg", "exp_avg_sq"):
            state[f"{i}.{key}"] = torch.randn(shape, device=device, generator=g)
    return state


def nbytes(state: dict[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in state.values())


def gbps(n: int, ms: float) -> float:
    return n / (ms * 1e-3) / 1e9


# --------------------------------------------------------------------------------------------- bandwidth


def copy_bandwidth(n: int, device: torch.device, pinned: bool, repeats: int) -> dict:
    """Plain D2H and H2D of n bytes as one tensor: the yardstick for the bank."""
    dev = torch.empty(n, dtype=torch.uint8, device=device).fill_(1)
    host = torch.empty(n, dtype=torch.uint8, pin_memory=pinned)
    d2h = time_fn(lambda: host.copy_(dev, non_blocking=True), repeats=repeats, device=device)
    h2d = time_fn(lambda: dev.copy_(host, non_blocking=True), repeats=repeats, device=device)
    return {"d2h": d2h, "h2d": h2d}


def bank_bandwidth(state: dict[str, torch.Tensor], bank: HostStateBank, device: torch.device, repeats: int) -> dict:
    """Park every tensor (offload + wait for the copies) and unpark it (restore + wait), timed separately."""
    park_ms, unpark_ms = [], []
    for i in range(repeats + 2):  # two warm-ups: the first grows the arena
        synchronize(device)
        with Timer(device) as t:
            for name, tensor in state.items():
                bank.offload(name, tensor)
            bank.synchronize()
        state = {}  # the bank holds the only copy now, as after a real park
        park_ms.append(t.elapsed_ms())
        with Timer(device) as t:
            for name in list(bank):
                state[name] = bank.restore(name)
        unpark_ms.append(t.elapsed_ms())
    return {"park": summarize(park_ms[2:]), "unpark": summarize(unpark_ms[2:]), "state": state}


# ------------------------------------------------------------------------------------------ switch stall


def calibrated_compute(device: torch.device, step_ms: float):
    """A matmul loop lasting about step_ms: the forward/backward of a simulated step."""
    n = 2048 if device.type == "cuda" else 256
    a = torch.randn(n, n, device=device) / n**0.5

    def loop(iters):
        x = a
        for _ in range(iters):
            x = x @ a
        return x

    one = time_fn(lambda: loop(10), warmup=2, repeats=5, device=device)["median_ms"] / 10
    iters = max(1, round(step_ms / one))
    return lambda: loop(iters), iters


def switch_stall(bank: HostStateBank, device: torch.device, n_params: float, step_ms: float, repeats: int) -> dict:
    compute, iters = calibrated_compute(device, step_ms)
    layers = [layer_state(n_params, device, seed=s) for s in range(2)]
    active = 0
    for name, t in layers[1].items():
        bank.offload(f"L1/{name}", t)
    layers[1] = None

    def optimizer_touch(state):
        for t in state.values():
            t.mul_(0.999)  # reads and writes the moments, like an AdamW update would

    def ordinary_step():
        compute()
        optimizer_touch(layers[active])

    names = list(layers[0])

    def switch_step():
        nonlocal active
        incoming = 1 - active
        for name in names:  # park the outgoing layer as the step starts (its D2H overlaps the compute)
            bank.offload(f"L{active}/{name}", layers[active][name])
        layers[active] = None
        compute()
        # The optimizer step needs the incoming state now: restore returns the prefetched tensors if prefetch ran a
        # step earlier, otherwise its copy starts here and the step waits for all of it.
        layers[incoming] = {name: bank.restore(f"L{incoming}/{name}") for name in names}
        optimizer_touch(layers[incoming])
        active = incoming

    def prefetch_next():
        for name in names:
            bank.prefetch(f"L{1 - active}/{name}")

    ordinary = time_fn(ordinary_step, warmup=2, repeats=repeats, device=device)
    rows = {}
    for prefetch in (False, True):
        times = []
        for _ in range(repeats):
            synchronize(device)
            if prefetch:  # the step before the switch starts the copy (LisaConfig.prefetch_steps=1)
                prefetch_next()
            ordinary_step()
            with Timer(device) as t:
                switch_step()
            times.append(t.elapsed_ms())
        rows["with_prefetch" if prefetch else "without_prefetch"] = summarize(times)
    return {"ordinary_step": ordinary, "matmul_iters": iters, **rows}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer-params", type=float, default=None,
                        help="parameters per simulated layer (default: 202e6 on a GPU, 2e6 on CPU)")
    parser.add_argument("--step-ms", type=float, default=None, help="simulated step length (default 100 GPU, 20 CPU)")
    parser.add_argument("--repeats", type=int, default=None)
    parser.add_argument("--backend", default="auto", choices=["auto", "native", "fallback"])
    args = parser.parse_args(argv)

    device = default_device()
    gpu = device.type == "cuda"
    n_params = args.layer_params or (202e6 if gpu else 2e6)
    step_ms = args.step_ms or (100.0 if gpu else 20.0)
    repeats = args.repeats or (10 if gpu else 5)

    bank = HostStateBank(backend=args.backend)
    state = layer_state(n_params, device)
    n = nbytes(state)
    bank.reserve(state.values())
    pinned = copy_bandwidth(n, device, pinned=gpu, repeats=repeats)
    pageable = copy_bandwidth(n, device, pinned=False, repeats=repeats) if gpu else pinned
    moved = bank_bandwidth(state, bank, device, repeats)
    del state, moved["state"]

    rows = []
    for label, direction, stats in [("pinned copy (one tensor)", "d2h", pinned["d2h"]),
                                    ("pinned copy (one tensor)", "h2d", pinned["h2d"]),
                                    ("pageable copy (one tensor)", "d2h", pageable["d2h"]),
                                    ("pageable copy (one tensor)", "h2d", pageable["h2d"]),
                                    (f"bank park ({bank.backend})", "d2h", moved["park"]),
                                    (f"bank unpark ({bank.backend})", "h2d", moved["unpark"])]:
        ref = pinned[direction]["median_ms"]
        rows.append({"what": label, "dir": direction, "bytes": n, "median_ms": stats["median_ms"],
                     "p20_ms": stats["p20_ms"], "p80_ms": stats["p80_ms"], "GB/s": gbps(n, stats["median_ms"]),
                     "% of pinned": 100 * ref / stats["median_ms"]})
    print_table(rows, title=f"park/unpark of one layer's moments ({n / 2**20:.0f} MiB, {len(_LLAMA_LAYER) * 2} "
                            f"tensors) on {environment(device)['device']}")

    stall = switch_stall(bank, device, n_params, step_ms, repeats)
    base = stall["ordinary_step"]["median_ms"]
    stall_rows = []
    for key in ("without_prefetch", "with_prefetch"):
        ms = stall[key]["median_ms"]
        stall_rows.append({"switch": key.replace("_", " "), "step_ms": base, "switch_step_ms": ms,
                           "stall_ms": ms - base, "stall % of step": 100 * (ms - base) / base})
    print_table(stall_rows, title=f"LISA switch stall (simulated step {base:.1f} ms, {n / 2**20:.0f} MiB in and out)")

    path = write_results("bench_offload", {
        "layer_params": n_params, "state_bytes": n, "backend": bank.backend, "pinned": bank.pinned,
        "bandwidth": rows, "switch": stall_rows, "raw": {"pinned": pinned, "pageable": pageable,
                                                         "park": moved["park"], "unpark": moved["unpark"],
                                                         "stall": stall},
        "targets": {"park_unpark_min_pct_of_pinned": 80, "prefetched_stall_max_pct_of_step": 5},
    }, device)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
