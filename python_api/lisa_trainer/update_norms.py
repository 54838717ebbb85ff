"""What a LISA period did to its weights, measured for the period log.

- `UpdateNorms`: at a period's first step, a host copy of the weights that train in it; at its end, the 2-norm of
  each group's change (a group: a decoder layer, or an always-trainable module). `layer_weights="auto"` samples by
  these, and `train_log.jsonl` reports them.
- `GradientNorms` (module-wise sampling): each step, before the optimizer's update, the squared gradient norm of
  each active module (and of the always-trainable ones together), summed on the device over the period and read
  once at its end as a root-mean-square per step. The module sampler weights modules by them.

Both sum FSDP2 shards over the ranks (one all-reduce of a few numbers), so every rank holds the whole model's
figures and a checkpoint written by rank 0 resumes them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from lisa_kernels.optimizer import local_tensor

__all__ = ["GradientNorms", "UpdateNorms"]

# Update norms are computed on the parameter's device in chunks of this many elements, so a 128k x 4096 embedding
# needs a 64 MiB fp32 temporary, not 2 GiB.
_NORM_CHUNK = 1 << 24

Groups = list[tuple[str, list[nn.Parameter]]]  # (name, parameters), a tied parameter in one group only


@dataclass
class OpenPeriod:
    period: int
    first_step: int
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> host copy at first_step


class UpdateNorms:
    """Update norms of the open period's groups. `names` maps id(param) to the parameter's name (checkpoints hold
    the start weights by name); with `track=False` nothing is copied and `close` measures nothing."""

    def __init__(self, names: dict[int, str], track: bool):
        self.names, self.track = names, track
        self.opened: OpenPeriod | None = None

    def open(self, period: int, step: int, groups: Groups) -> None:
        opened = OpenPeriod(period, step)
        if self.track:
            for _, params in groups:
                for p in params:
                    opened.snapshots[id(p)] = local_tensor(p.detach()).to("cpu", copy=True)
        self.opened = opened

    def close(self, groups: Groups) -> dict[str, float]:
        """The 2-norm of each group's change since `open` (empty without tracking); the period is closed."""
        opened, self.opened = self.opened, None
        if not self.track:
            return {}
        totals = torch.zeros(len(groups), dtype=torch.float64)
        for g, (_, params) in enumerate(groups):
            for p in params:
                totals[g] += _sq_diff_norm(local_tensor(p.detach()), opened.snapshots[id(p)]).cpu()
        totals = _sum_over_shards(totals, [p for _, params in groups for p in params])
        return {name: math.sqrt(total) for (name, _), total in zip(groups, totals.tolist())}

    def start_state(self) -> dict | None:
        """The open period's first step and the weights it started from (host tensors by parameter name); None
        between periods."""
        opened = self.opened
        if opened is None:
            return None
        return {"period": opened.period, "first_step": opened.first_step,
                "snapshots": {self.names[i]: t for i, t in opened.snapshots.items()}}

    def load_start_state(self, state: dict, model: nn.Module) -> None:
        by_name = {n: id(p) for n, p in model.named_parameters()}
        self.opened = OpenPeriod(state["period"], state["first_step"],
                                 {by_name[n]: t for n, t in state["snapshots"].items()})


class GradientNorms:
    """Per-period gradient norms of the active modules (module-wise sampling), measured by an optimizer step
    pre-hook on `optimizer`; `groups()` gives the groups to measure now: the active modules', then (last) the
    always-trainable modules' together."""

    def __init__(self, optimizer: torch.optim.Optimizer, groups):
        self.groups = groups
        self.sq: torch.Tensor | None = None  # summed on the device: no synchronisation per step
        self.steps = 0
        optimizer.register_step_pre_hook(self._measure)

    def restart(self, device: torch.device) -> None:
        """A new period: its sums start at zero."""
        self.sq = torch.zeros(len(self.groups()), dtype=torch.float32, device=device)
        self.steps = 0

    def read(self) -> list[float]:
        """The period's root-mean-square gradient norm per step of each group; the sums restart."""
        rms = [math.sqrt(s / self.steps) if self.steps else 0.0 for s in self.sq.tolist()]
        self.sq.zero_()
        self.steps = 0
        return rms

    def state(self) -> dict | None:
        """The open period's sums so far, for a checkpoint (so a resumed run logs the same norms, and so samples
        the same modules later, as an uninterrupted one)."""
        return None if self.sq is None else {"steps": self.steps, "sq_sums": self.sq.tolist()}

    def load_state(self, state: dict) -> None:
        self.steps = state["steps"]
        self.sq = torch.tensor(state["sq_sums"], dtype=torch.float32, device=self.sq.device)

    def _measure(self, optimizer, args, kwargs) -> None:
        groups = [params for _, params in self.groups()]
        sq = torch.zeros(len(groups), dtype=torch.float32, device=self.sq.device)
        for g, params in enumerate(groups):
            for p in params:
                if p.grad is not None:
                    grad = local_tensor(p.grad)
                    values = grad.coalesce().values() if grad.is_sparse else grad
                    sq[g] += values.float().square().sum().to(sq.device)
        self.sq += _sum_over_shards(sq, [p for params in groups for p in params])
        self.steps += 1


def _sum_over_shards(totals: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """`totals` summed over the ranks when `params` are FSDP2 shards (each rank measured its own): one all-reduce
    of a few numbers, on the device of the shards (NCCL moves device tensors only), given back where it was; as
    they are otherwise."""
    sharded = next((p for p in params if hasattr(p, "device_mesh")), None)
    if sharded is None:
        return totals
    import torch.distributed as dist

    on_comm = totals.to(local_tensor(sharded).device)
    dist.all_reduce(on_comm, group=sharded.device_mesh.get_group())
    return on_comm.to(totals.device)


def _sq_diff_norm(current: torch.Tensor, snapshot: torch.Tensor) -> torch.Tensor:
    """sum((current - snapshot)**2) in fp32 on `current`'s device, chunked to bound the temporary."""
    flat_now, flat_then = current.reshape(-1), snapshot.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=current.device)
    for start in range(0, flat_now.numel(), _NORM_CHUNK):
        now = flat_now[start:start + _NORM_CHUNK].float()
        then = flat_then[start:start + _NORM_CHUNK].to(current.device, non_blocking=True).float()
        total += (now - then).square().sum()
    return total
