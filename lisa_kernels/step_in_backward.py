"""StepInBackward: the optimizer step fused into backward. Each trainable tensor is updated the moment its gradient
is complete, and the gradient is freed right after.

A plain step keeps every trainable tensor's gradient alive from its backward until `optimizer.step()`. In a LISA
step on Llama-3-8B that is the LM head (525M parameters, 1.05 GB in bf16), two decoder layers (436M, 0.87 GB) and
the input embedding (1.05 GB dense): ~3 GB at once. Updated in backward, one tensor's gradient is alive at a
time, so the peak is the largest single one (the head's, 1.05 GB).

    with StepInBackward(optimizer) as stepping:  # hooks the optimizer's params that require grad now
        loss.backward()                           # each tensor is updated here, its .grad set to None
    grad_norm, finite = stepping.grad_norm(), stepping.finite

The update is the one `optimizer.step()` after backward would make, bit for bit (with stochastic rounding: the
same distribution, other noise), when nothing needs all the gradients before the first update. That rules out:

- clipping by the global gradient norm: the norm is known only after the last tensor has been updated;
- gradient accumulation: every backward updates, so micro-batches would each make a step;
- GradScaler: its inf check and unscaling span all gradients;
- DistributedDataParallel / FSDP: they reduce gradients over the ranks after the hooks have run.

None of these is detected here; the caller refuses them (`lisa_trainer`'s `--optimizer_in_backward` does).

Other differences from a step after backward:

- a tensor whose gradient is not finite is not updated (no NaN/inf gradient reaches the weights) and the step is
  marked non-finite (`finite`), but tensors updated earlier in the same backward stay updated: a step after
  backward that skips on a non-finite norm would have updated none;
- a weight changes while backward is still running. Autograd's own graph never reads it again (a leaf's gradient
  is complete only after every use of it has been differentiated), but a custom autograd Function that saves a
  weight detached from the graph, or a backward hook that reads another tensor's weight, would see it updated;
- the finiteness check is one host sync per tensor (about 21 a LISA step on Llama at γ=2: 9 tensors a layer, the
  embedding, the head and the final norm), and each tensor is its own optimizer launch;
- the optimizer's step hooks (`register_step_pre_hook` / `_post_hook`) do not run (`FusedAdamW.step_param`
  brings parked state back itself), and a learning-rate scheduler's "step before optimizer.step()" check does not
  see these updates;
- a post-accumulate-grad hook fires once per backward for each leaf (with non-reentrant gradient checkpointing a
  layer's gradients arrive during its recompute-backward), so two backwards over one graph update twice.
"""

from __future__ import annotations

from typing import Iterable

import torch

__all__ = ["StepInBackward"]


class StepInBackward:
    """Updates each of `params` (default: every param of `optimizer`) with `optimizer.step_param(param)` as soon as
    its gradient is complete during backward, then sets its `.grad` to None; see the module docstring for when this
    equals a step after backward.

    Only params that require grad when it is attached get a hook (torch refuses hooks on the others): attach it
    after choosing what trains (with LISA, after the controller's `on_step_begin`), e.g. once per step around
    backward with `with StepInBackward(optimizer) as stepping: loss.backward()`.

    A hook acts on a param that requires grad and has a gradient. It adds the gradient's squared norm (fp32, on the
    gradient's device, no host sync) to the step's total, and skips the update of a tensor whose norm is not finite.
    `grad_norm()`, `finite` and `skipped` describe the backwards since construction or the last `reset()`.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, params: Iterable[torch.Tensor] | None = None):
        if not callable(getattr(optimizer, "step_param", None)):
            raise TypeError(f"StepInBackward needs an optimizer with step_param(param) (lisa_kernels.FusedAdamW), "
                            f"got {type(optimizer).__name__}")
        self.optimizer = optimizer
        if params is None:
            params = [p for group in optimizer.param_groups for p in group["params"]]
        trainable = {id(p): p for p in params if p.requires_grad}  # a param listed twice gets one hook
        self._handles = [p.register_post_accumulate_grad_hook(self._on_grad) for p in trainable.values()]
        self.reset()

    def reset(self) -> None:
        """Start a new step: forget the gradient norm and the skipped tensors."""
        self._squared_norm: torch.Tensor | None = None
        self.skipped: list[torch.Tensor] = []

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def detach(self) -> None:
        """Remove the hooks: later backwards leave gradients for `optimizer.step()` as usual."""
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> StepInBackward:
        return self

    def __exit__(self, *exc) -> None:
        self.detach()

    @property
    def finite(self) -> bool:
        """Whether every gradient since the last `reset()` was finite (and so every tensor was updated)."""
        return not self.skipped

    def grad_norm(self) -> torch.Tensor:
        """The L2 norm of all gradients since the last `reset()`, as a 0-d fp32 tensor (0 when there were none)."""
        if self._squared_norm is None:
            return torch.zeros((), dtype=torch.float32)
        return self._squared_norm.sqrt()

    def _on_grad(self, param: torch.Tensor) -> None:
        grad = param.grad
        if grad is None or not param.requires_grad:
            return
        if grad.is_sparse:  # nn.Embedding(sparse=True): a row per token; the norm is its coalesced rows'
            grad = param.grad = grad.coalesce()
            grad = grad.values()
        # dtype=: torch reduces a bf16/fp16 CUDA tensor into fp32 inside the kernel, where .float() would first copy
        # the gradient (2 GB for a bf16 head at Llama-3-8B). On CPU torch makes that copy either way.
        norm = torch.linalg.vector_norm(grad, dtype=torch.float32)
        squared = norm.square()
        total = self._squared_norm
        self._squared_norm = squared if total is None else total + squared.to(total.device)
        if bool(torch.isfinite(norm)):  # the one host sync per tensor: the update must not see NaN/inf
            self.optimizer.step_param(param)
        else:
            self.skipped.append(param)
        param.grad = None
