"""bench_finetune on several ranks (``--nproc N``): each method data-parallel, bytes communicated counted.

- full fine-tuning and LoRA: torch DistributedDataParallel (every trainable parameter is used in every step, so no
  ``find_unused_parameters``), with a comm hook that counts the bytes of every bucket it all-reduces;
- LISA (ours and the public variant): `lisa_trainer.gradient_sync.GradientSync`, which all-reduces the active
  layers + embeddings/head/final norm only, rebuilt at each switch after the schedule check;
- with ``--fsdp``: FSDP2 (`lisa_trainer.distributed`, one unit per decoder layer + the root) for full fine-tuning
  and LISA; the bytes are those reduce-scattered (the gradients of the trainable set);
- the Hugging Face Trainer with `LisaCallback` (its own DDP wrapper; the bytes are those the callback logs as
  ``lisa/allreduce_bytes``): LISA's all-reduce of the trainable set, or DDP over the whole model with
  ``find_unused_parameters=True``.

Every rank trains its own synthetic batches (seed + rank); rank 0 reports, with every rank's peak memory.
"""
from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


class BenchDataParallel:
    """One method's data-parallel machinery: create before `setup_method` (FSDP shards the model there, before the
    optimizer sees its parameters), then `wrap` the method's model; `model` is what the step loop calls."""

    def __init__(self, method: str, model, device: torch.device, fsdp: bool):
        from lisa_trainer.distributed import DataParallel

        if fsdp and method == "lora":
            raise ImportError("LoRA under FSDP is not measured by this benchmark (peft wraps after sharding)")
        self.method, self.fsdp = method, fsdp
        self.parallel, _ = DataParallel.setup(device, fsdp=fsdp)
        self.controller = self.model = None
        self._counted = 0
        if fsdp:
            self.parallel.attach(model, model.model.layers)

    def wrap(self, model, controller):
        self.controller = controller
        if self.fsdp:
            self.model = model
        elif self.method.startswith("lisa"):
            self.parallel.attach(model, controller.layers)
            self.model = model
        else:
            from torch.nn.parallel import DistributedDataParallel

            device = next(model.parameters()).device
            self.model = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
            self.model.register_comm_hook(self, _counting_allreduce)
        return self.model

    def backward(self, loss: torch.Tensor) -> int:
        """`loss.backward()` with the gradients averaged over the ranks; returns the bytes they cost."""
        if isinstance(self.model, torch.nn.parallel.DistributedDataParallel):  # its hook all-reduces (mean)
            loss.backward()
            sent, self._counted = self._counted, 0
            return sent
        if self.controller is not None:  # a switch: every rank's layers checked, the buckets rebuilt
            self.parallel.on_step_begin(self.controller.active_layers, len(self.controller.layers))
        # The lisa_trainer machinery takes each rank's share of a global mean: here 1/N of the rank's mean loss.
        self.parallel.backward(loss / self.parallel.world_size, last=True)
        return self.parallel.finish_gradients()

    def report(self, device: torch.device, bytes_per_step: list[int]) -> dict:
        """Figures of every rank (gathered on all; rank 0 writes them)."""
        return rank_figures(("reduce-scatter (FSDP2)" if self.fsdp else
                             "all-reduce (DDP)" if isinstance(self.model, torch.nn.parallel.DistributedDataParallel)
                             else "all-reduce (active set)"), device, bytes_per_step)


class TrainerReport:
    """`report` of a method the Hugging Face Trainer runs data-parallel (it owns the DDP wrapper)."""

    def __init__(self, grad_comm: str):
        self.grad_comm = grad_comm

    def report(self, device: torch.device, bytes_per_step: list[int]) -> dict:
        return rank_figures(self.grad_comm, device, bytes_per_step)


def rank_figures(grad_comm: str, device: torch.device, bytes_per_step: list[int]) -> dict:
    """The gradient communication per step and every rank's peak memory (a collective: every rank calls it)."""
    from lisa_trainer.runlog import peak_host_rss_bytes

    mine = {
        "peak_allocated_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else None,
        "peak_rss_gb": peak_host_rss_bytes() / 1e9,
    }
    ranks = [None] * dist.get_world_size()
    dist.all_gather_object(ranks, mine)
    steady = bytes_per_step[1:] or bytes_per_step
    return {
        "world_size": dist.get_world_size(),
        "grad_comm": grad_comm,
        "grad_comm_bytes_per_step": sorted(steady)[len(steady) // 2],
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
