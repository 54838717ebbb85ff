"""The gradient all-reduce of LISA's trainable set, overlapped with backward, and its use inside a Hugging Face
Trainer's DDP.

- `GradientSync` all-reduces the gradients of the parameters that train now (the active decoder layers plus the
  always-trainable embeddings, head and final norm) in ~25 MiB buckets launched from
  ``register_post_accumulate_grad_hook`` while backward still runs; a frozen layer has no gradient and is in no
  bucket. `DataParallel.attach` creates one for `LisaTrainer`.
- `TrainerDataParallel` (`LisaCallback` under torchrun or accelerate): the Trainer's DDP keeps one always-trainable
  parameter and a `GradientSync` all-reduces the rest, averaged as DDP averages.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .distributed import DataParallel, DistributedError

__all__ = ["BUCKET_BYTES", "GradientSync", "TrainerDataParallel"]

# Gradient bucket size: big enough that per-collective latency is amortised (NCCL reaches most of its bus
# bandwidth above ~16 MiB messages), small enough that the first buckets go out while backward still runs.
BUCKET_BYTES = 25 * 2**20


class GradientSync:
    """All-reduce (sum) of the trainable parameters' gradients, bucketed and overlapped with backward.

    `rebuild()` (at each LISA switch) lays the parameters with ``requires_grad`` into buckets of one dtype, in
    reverse registration order (roughly the order backward produces them). Every parameter carries a
    post-accumulate-grad hook; while `armed` (the last local micro-batch of a step), a bucket is all-reduced as
    soon as it and every bucket before it are complete, so all ranks issue the same collectives in the same order.
    `finish()` launches what is left (a rank whose share of the step was empty contributes zeros), waits, and
    writes the sums back into ``.grad``; it returns the bytes all-reduced. `finish_after_backward` arms it for the
    backward pass of a forward's outputs and calls `finish()` when that backward ends.

    ``exclude``: parameters someone else reduces (left out of the buckets). ``average``: divide the sums by the
    number of ranks, as DDP does (for a loss that is each rank's own mean rather than its share of the global one).
    """

    def __init__(self, model: nn.Module, parallel: DataParallel, bucket_bytes: int = BUCKET_BYTES, *,
                 exclude=(), average: bool = False):
        self.model, self.parallel, self.bucket_bytes = model, parallel, bucket_bytes
        self.excluded = {id(p) for p in exclude}
        self.average = average
        self.armed = False
        self.sent = 0  # bytes all-reduced by the `finish()` calls of `finish_after_backward`, for the caller to read
        self._finish_queued = False
        self.buckets: list[list[nn.Parameter]] = []
        self._bucket_of: dict[nn.Parameter, int] = {}
        self._missing: list[int] = []
        self._launched: list[tuple[torch.Tensor, object]] = []
        self._hooks: dict[nn.Parameter, object] = {}  # torch hooks only params that require grad: added as they do
        self.rebuild()

    @property
    def n_elements(self) -> int:
        return sum(p.numel() for b in self.buckets for p in b)

    def rebuild(self) -> None:
        if self._launched:
            raise RuntimeError("GradientSync.rebuild() during a step, before finish()")
        open_buckets: dict[torch.dtype, tuple[list, list]] = {}  # dtype -> (params, [bytes])
        self.buckets = []
        for p in reversed(list(dict.fromkeys(self.model.parameters()))):
            if not p.requires_grad or id(p) in self.excluded:
                continue
            if p not in self._hooks:
                self._hooks[p] = p.register_post_accumulate_grad_hook(self._on_grad)
            bucket, size = open_buckets.setdefault(p.dtype, ([], [0]))
            bucket.append(p)
            size[0] += p.numel() * p.element_size()
            if size[0] >= self.bucket_bytes:
                self.buckets.append(open_buckets.pop(p.dtype)[0])
        self.buckets += [bucket for bucket, _ in open_buckets.values()]
        self._bucket_of = {p: i for i, b in enumerate(self.buckets) for p in b}
        self._reset()

    def close(self) -> None:
        """Remove the gradient hooks (the model may train again under another sync)."""
        for handle in self._hooks.values():
            handle.remove()
        self._hooks = {}
        self.buckets, self._bucket_of = [], {}

    def _reset(self) -> None:
        self._missing = [len(b) for b in self.buckets]
        self._launched = []

    def _on_grad(self, param: nn.Parameter) -> None:
        index = self._bucket_of.get(param)
        if not self.armed or index is None:
            return
        self._missing[index] -= 1
        while len(self._launched) < len(self.buckets) and self._missing[len(self._launched)] == 0:
            self._launch(len(self._launched))

    def _launch(self, index: int) -> None:
        bucket = self.buckets[index]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in bucket])
        if self.average:
            flat.div_(self.parallel.world_size)  # before the sum, as DDP: the same rounding as DDP's result
        work = self.parallel.collective("gradient all-reduce", dist.all_reduce, flat, async_op=True)
        self._launched.append((flat, work))

    def finish(self) -> int:
        """Complete the step's all-reduce; returns the bytes all-reduced (the gradients of the trainable set)."""
        self.armed = False
        while len(self._launched) < len(self.buckets):
            self._launch(len(self._launched))
        sent = 0
        with torch.no_grad():
            for bucket, (flat, work) in zip(self.buckets, self._launched):
                self.parallel.collective("gradient all-reduce", work.wait)
                sent += flat.numel() * flat.element_size()
                for p, summed in zip(bucket, flat.split([p.numel() for p in bucket])):
                    if p.grad is None:
                        p.grad = summed.view_as(p).clone()
                    else:
                        p.grad.copy_(summed.view_as(p))
        self._reset()
        return sent

    def finish_after_backward(self, outputs) -> None:
        """Arm for the backward pass that starts from the tensors in `outputs` (a forward's result: a tensor, a
        dict or a sequence of them) and complete the all-reduce when that backward ends, whoever runs it: the
        first of the outputs' gradients queues `finish()` on the autograd engine, which runs queued callbacks once
        the whole backward is done (reentrant checkpointing's inner backward passes included), so gradient
        clipping and the optimizer see summed gradients."""
        tensors = [t for t in _tensors_in(outputs) if t.requires_grad]
        if not tensors:
            return
        self.armed = True
        for t in tensors:
            t.register_hook(self._queue_finish)

    def _queue_finish(self, grad):
        if self.armed and not self._finish_queued:
            self._finish_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finish_from_backward)

    def _finish_from_backward(self) -> None:
        self._finish_queued = False
        self.sent += self.finish()


class TrainerDataParallel:
    """LISA's gradient all-reduce inside a Hugging Face Trainer's DDP (`LisaCallback` under torchrun or accelerate).

    The Trainer wraps the model in DDP when training starts, before any callback sees the wrapper, and DDP expects
    a gradient for every parameter it holds: for the layers LISA freezes it either raises "Expected to have
    finished reduction" (``find_unused_parameters=False``, the Trainer's choice with gradient checkpointing) or
    traverses the graph and all-reduces the whole model's buckets, frozen layers' zeros included. So
    `keep_out_of_ddp`, called when the Trainer is built, leaves DDP one parameter, the smallest
    always-trainable one (the final norm's weight), which has a gradient in every step, so DDP's reducer is
    satisfied whatever ``ddp_find_unused_parameters`` and gradient checkpointing say. `GradientSync` all-reduces
    the rest of the trainable set (active layers, embeddings, head), rebuilt at each switch, averaged over the
    ranks as DDP averages. It arms in the forward of each optimizer step's last micro-batch (accelerate's
    ``sync_gradients``) and completes when that backward ends, before the Trainer clips the gradients.

    ``kept=None``: the Trainer's DDP holds every parameter and reduces them all (the model was built without
    `keep_out_of_ddp`); only the schedule check and the byte count remain here. Create it before LISA freezes
    any layer: DDP holds the parameters that train now, and every rank starts from rank 0's weights. The buckets
    are laid out at the first `on_step_begin`.
    """

    def __init__(self, model: nn.Module, kept: nn.Parameter | None):
        self.parallel = DataParallel(next(model.parameters()).device)
        self._hook = None
        if kept is None:
            self.ddp_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
            return
        self.ddp_bytes = kept.numel() * kept.element_size()
        self.parallel.attach(model, exclude=[kept], average=True)
        self._hook = model.register_forward_hook(self._after_forward)

    @staticmethod
    def keep_out_of_ddp(model: nn.Module, kept_name: str) -> None:
        """Before the Trainer wraps `model` in DDP: every parameter but `kept_name` is left out of DDP."""
        from torch.nn.parallel import DistributedDataParallel

        ignored = [name for name, _ in model.named_parameters() if name != kept_name]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, ignored)

    @staticmethod
    def kept_parameter(model: nn.Module) -> nn.Parameter | None:
        """The parameter `keep_out_of_ddp` left to DDP; None if it was not called on `model`."""
        ignored = getattr(model, "_ddp_params_and_buffers_to_ignore", None)
        if ignored is None:
            return None
        kept = [p for name, p in model.named_parameters() if name not in set(ignored)]
        return kept[0] if len(kept) == 1 else None

    def on_step_begin(self, controller) -> None:
        c = controller.config
        self.parallel.on_step_begin(controller.active_units, controller.n_units, period=controller.period,
                                    settings=(c.seed, c.interval_steps), unit=controller.unit_name)

    def step_bytes(self) -> int:
        """After a step's last backward, before its update: the bytes all-reduced in it (this sync's and DDP's);
        raises if the all-reduce did not run."""
        sync = self.parallel.grad_sync
        if sync is None:
            return self.ddp_bytes
        if sync.armed:
            raise DistributedError("LisaCallback: the step's backward did not start from the model's outputs, so "
                                   "its gradients were not all-reduced")
        sent, sync.sent = sync.sent, 0
        return sent + self.ddp_bytes

    def close(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self.parallel.grad_sync.close()

    def _after_forward(self, module, inputs, outputs) -> None:
        from accelerate.state import GradientState

        if torch.is_grad_enabled() and module.training and GradientState().sync_gradients:
            self.parallel.grad_sync.finish_after_backward(outputs)


def _tensors_in(outputs):
    if isinstance(outputs, torch.Tensor):
        yield outputs
    elif isinstance(outputs, dict):  # transformers' ModelOutput is a dict
        for value in outputs.values():
            yield from _tensors_in(value)
    elif isinstance(outputs, (list, tuple)):
        for value in outputs:
            yield from _tensors_in(value)
