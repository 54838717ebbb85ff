"""bench_finetune on several ranks (``--nproc N``): each method data-parallel, bytes communicated counted.

- full fine-tuning and LoRA: torch DistributedDataParallel (every trainable parameter is used in every step, so no
  ``find_unused_parameters``), with a comm hook that counts the bytes of every bucket it all-reduces;
- LISA (ours and the public variant): `lisa_trainer.distributed.GradientSync`, which all-reduces the active
  layers + embeddings/head/final norm only, rebuilt at each switch after the schedule check.

Every rank trains its own synthetic batches (seed + rank); rank 0 reports, with every rank's peak memory.
"""
from __future__ import annotations

import os
import resource
import sys

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class BenchDataParallel:
    """Wraps one method's model for data parallel training; `model` is what the step loop calls."""

    def __init__(self, method: str, model, controller, device: torch.device):
        from lisa_trainer.distributed import DataParallel

        self.parallel, _ = DataParallel.setup(device)
        self.controller = controller
        self._counted = 0
        if method.startswith("lisa"):
            self.parallel.attach(model, controller.layers)
            self.model = model
        else:
            from torch.nn.parallel import DistributedDataParallel

            ids = [device.index] if device.type == "cuda" else None
            self.model = DistributedDataParallel(model, device_ids=ids)
            self.model.register_comm_hook(self, _counting_allreduce)

    def backward(self, loss: torch.Tensor) -> int:
        """`loss.backward()` with the gradients averaged over the ranks; returns the bytes all-reduced."""
        if self.controller is None:  # DDP: its hook all-reduces (mean) during backward
            loss.backward()
            sent, self._counted = self._counted, 0
            return sent
        # A switch: check every rank samples the same layers, rebuild the buckets. GradientSync sums, so the
        # per-rank mean loss is divided by the world size for a mean over the ranks, as DDP gives.
        self.parallel.on_step_begin(self.controller.active_layers, len(self.controller.layers))
        self.parallel.grad_sync.armed = True
        (loss / self.parallel.world_size).backward()
        return self.parallel.grad_sync.finish()

    def report(self, device: torch.device, bytes_per_step: list[int]) -> dict:
        """Figures of every rank (gathered on all; rank 0 writes them)."""
        mine = {
            "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
            "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9,
        }
        ranks = [None] * self.parallel.world_size
        dist.all_gather_object(ranks, mine)
        steady = bytes_per_step[1:] or bytes_per_step
        return {
            "world_size": self.parallel.world_size,
            "allreduce_bytes_per_step": sorted(steady)[len(steady) // 2],
            "per_rank_peak_allocated_gb": [r["peak_allocated_gb"] for r in ranks],
            "per_rank_peak_rss_gb": [r["peak_rss_gb"] for r in ranks],
        }


def _counting_allreduce(state: BenchDataParallel, bucket):
    """DDP's default all-reduce (mean), counting the bucket's bytes."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    buffer = bucket.buffer()
    state._counted += buffer.numel() * buffer.element_size()
    return allreduce_hook(None, bucket)


def launcher(nproc: int) -> list[str]:
    """The command prefix that starts a benchmark worker: python, or torchrun with `nproc` ranks on this machine."""
    if nproc <= 1:
        return [sys.executable]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]


def worker_argv(argv: list[str]) -> list[str]:
    """The driver's arguments without --nproc: torchrun would take it for its own --nproc-per-node, and a worker
    learns its rank and world size from torchrun's environment."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--nproc":
            skip = True
        elif not arg.startswith("--nproc="):
            out.append(arg)
    return out
