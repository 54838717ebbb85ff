"""FSDP2 on the meta device for bench_memory: a fake process group of N ranks, the model sharded through the
package's own `DataParallel(fsdp=True).attach`, and what FSDP2 holds beyond a rank's shards during a step.

torch's "fake" backend (`torch.testing._internal.distributed.fake_pg`) returns from every collective at once and
moves nothing, so FSDP2 cuts the meta parameters into DTensors holding one rank's shard and the rest of the package
(optimizer, controller, host state bank) sees `world` processes; bench_memory then counts that rank's bytes. FSDP2
refuses to gather meta parameters, so `fsdp_figures` derives the gathered weights and whole gradients from the shards.
"""
from __future__ import annotations

import contextlib
import math
import os

import torch


@contextlib.contextmanager
def fake_world(world: int, rank: int):
    """A default process group of `world` ranks in which this process is `rank`, on torch's "fake" backend (its
    collectives return at once and move nothing), with WORLD_SIZE and RANK set as torchrun sets them: FSDP2 shards
    the model for real and the package sees `world` processes."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("bench_memory: the sharded accounting needs its own process group; one is already up")
    saved = {key: os.environ.get(key) for key in ("WORLD_SIZE", "RANK")}
    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
    os.environ.update(WORLD_SIZE=str(world), RANK=str(rank))
    try:
        yield
    finally:
        dist.destroy_process_group()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def shard(model, device: torch.device) -> None:
    """`lisa_trainer.distributed.DataParallel(fsdp=True).attach`: rank 0's weights broadcast, then one FSDP2 unit
    per decoder layer plus the root. The mesh is a CPU mesh (a meta mesh has no device to place shards on; FSDP2
    leaves meta parameters on meta); the broadcast runs on the meta tensors themselves, which the fake group does
    not read (gloo's path would first copy them to the CPU, and meta tensors have no data to copy)."""
    from lisa_trainer.distributed import DataParallel
    from lisa_trainer.layers import find_decoder_layers

    parallel = DataParallel(torch.device("cpu"), fsdp=True)
    parallel._comm_device = device
    _, layers = find_decoder_layers(model)
    parallel.attach(model, layers)


def gathered_bytes(params, world: int) -> int:
    """FSDP2's all-gather output for these sharded parameters: every rank's shard, each padded to the largest (dim 0
    is cut in pieces of ceil(rows / world) rows, as torch.chunk cuts it), in the parameters' dtype."""
    return sum(world * -(-p.shape[0] // world) * math.prod(p.shape[1:]) * p.element_size() for p in params)


def fsdp_figures(model, world: int) -> dict:
    """What FSDP2 holds on a rank beyond its shards while a step runs, in bytes, from the sharded parameters (on meta
    FSDP2 refuses to gather: these terms follow FSDP2's schedule, they are not allocations seen):

    - root_gathered: the root unit (embedding, final norm, head) whole; FSDP2 does not reshard the root after
      forward, so it stays gathered through backward;
    - layers_gathered: two decoder layers whole: the one computing and the next, which FSDP2 prefetches (in forward,
      recompute and backward alike; frozen layers are gathered as trained ones are);
    - grads_unsharded: gradients are whole until their unit's reduce-scatter: the root's trainable parameters' (the
      head's gradient arrives first in backward and waits for the root's reduce-scatter at its end) plus the
      largest trainable decoder layer's;
    - uneven: parameters whose rows do not split evenly (then rank 0 holds the largest shards, and the others less).
    """
    from lisa_trainer.layers import find_decoder_layers

    _, layers = find_decoder_layers(model)
    in_layers = {id(p) for layer in layers for p in layer.parameters()}
    root = [p for p in model.parameters() if id(p) not in in_layers]
    out = {
        "root_gathered": gathered_bytes(root, world),
        "layers_gathered": 2 * max(gathered_bytes(layer.parameters(), world) for layer in layers),
        "grads_unsharded": gathered_bytes([p for p in root if p.requires_grad], world) + max(
            gathered_bytes([p for p in layer.parameters() if p.requires_grad], world) for layer in layers),
    }
    out["total"] = sum(out.values())
    out["uneven"] = [name for name, p in model.named_parameters() if p.shape[0] % world]
    return out
