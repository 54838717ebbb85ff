"""The memory features of a LISA run, decided once, in one place.

| feature | what it saves | applies when |
| --- | --- | --- |
| row-sparse embedding state (`sparse_embedding_state`) | moments for the tokens seen, not the vocabulary | FusedAdamW, head not tied, not FSDP |
| row-sparse embedding gradient (`sparse_embedding_grad`) | the step's tokens x hidden, not vocabulary x hidden | the state above, one process, an `nn.Embedding` |
| chunked LM-head loss (`chunked_loss`) | never the whole logits | not FSDP; a model with a `base_model` and an `nn.Linear` head |
| optimizer step inside backward (`optimizer_in_backward`) | one gradient alive at a time | one process, FusedAdamW, no clipping, no accumulation, whole layers |
| frozen-layer weight offload (`offload_frozen_layers`) | frozen layers' weights in host memory | gradient checkpointing, one process, `LisaTrainer` |
| parking (`state_policy="park"`) | frozen layers' optimizer state in host memory | always (`LisaController`, `lisa_kernels.StateParker`) |

`MemoryFeatures` is built from the model, the `LisaConfig`, the training arguments and the process layout. It checks
every rule that joins them (an `OptionError` naming the flags), logs one line per feature (with the reason where one
is off), builds the optimizer, the loss and the backward strategy, and owns the frozen-weight offload: it creates it
when a controller takes the model and closes it when the model is handed back. The training loop needs a few hooks
of it: `take_model` / `release_model` around training, `after_backward` after each backward, `weights_on_device`
around a checkpoint's weights being loaded and `after_checkpoint_load` after its optimizer state. `LisaTrainer`,
`LisaCallback` (what applies there: the optimizer) and the benchmarks use it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math

import torch
from torch import nn

from lisa_kernels import FusedAdamW, StepInBackward

from .arguments import LisaConfig, LisaTrainingArguments
from .frozen_weights import FrozenWeightOffload
from .gradients import clip_grad_norm
from .layers import embedding_module, enable_gradient_checkpointing
from .loss import ChunkedCausalLMLoss
from .optimizers import build_optimizer
from .options import OptionError

__all__ = ["MemoryFeatures", "check_callback_config", "check_training_arguments", "use_sparse_embedding_grad"]

logger = logging.getLogger(__name__)


def check_training_arguments(args: LisaTrainingArguments) -> None:
    """The rules joining `LisaTrainingArguments` fields (run when they are constructed): the optimizer step inside
    backward needs every gradient of a step to be its last one."""
    if not args.optimizer_in_backward:
        return
    needs = [("max_grad_norm", args.max_grad_norm == 0, "0 (clipping scales every gradient by the norm of all of "
              "them, known only after the last update)"),
             ("gradient_accumulation_steps", args.gradient_accumulation_steps == 1, "1 (every backward updates, so "
              "each micro-batch would make a step)"),
             ("optim", args.optim == "adamw_lisa", "adamw_lisa (FusedAdamW's per-tensor step)")]
    for name, ok, value in needs:
        if not ok:
            raise OptionError(LisaTrainingArguments, "optimizer_in_backward", f"needs {{{name}}} {value}, got "
                              f"{getattr(args, name)!r}", (name,))


def check_callback_config(config: LisaConfig) -> None:
    """What `LisaCallback` cannot do in a Hugging Face Trainer's loop."""
    if config.offload_frozen_layers:
        raise OptionError(LisaConfig, "offload_frozen_layers", "is for LisaTrainer / lisa-finetune, which hand the "
                          "weights back to host memory after each backward; LisaCallback leaves that to the Trainer, "
                          "which does not")


class MemoryFeatures:
    """What of the memory features applies to this run, and the parts built from that (see the module docstring).

    `processes`: how many ranks train (1: one process); `fsdp`: whether they shard the model with FSDP2. The
    optimizer takes `args`' optim, learning rate, weight decay, betas and eps; `optimizer_kwargs` add to them or
    override them (e.g. a `state_bank`)."""

    def __init__(self, model: nn.Module, config: LisaConfig, args: LisaTrainingArguments, *, processes: int = 1,
                 fsdp: bool = False, **optimizer_kwargs):
        self.model, self.args = model, args
        self.check(config, args, processes)
        self.sharded = fsdp and processes > 1
        if self.sharded and config.sparse_embedding_state:
            # A checkpoint gathers each moment whole from the shards; the compact row-sparse form has no such layout.
            config = dataclasses.replace(config, sparse_embedding_state=False)
            logger.info("row-sparse embedding state: off (FSDP shards the embedding's moments)")
        self.config = config
        adamw = {} if args.optim == "adafactor" else {"betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        self.optimizer = build_optimizer(model, config, lr=args.learning_rate, weight_decay=args.weight_decay,
                                         optim=args.optim, **{**adamw, **optimizer_kwargs})
        # FSDP gathers the root's weights (embedding, head) in the model's own forward, which the chunked loss does
        # not call: it would meet the head's shards.
        self.chunked_loss = ChunkedCausalLMLoss(model) if args.chunked_loss and not self.sharded else None
        if args.chunked_loss and self.sharded:
            logger.info("chunked loss: off (FSDP gathers the head's weights in the model's own forward only)")
        self.data_parallel = processes > 1
        self.backward = (StepInsideBackward(self.optimizer) if args.optimizer_in_backward
                         else BackwardThenStep(self.optimizer, args.max_grad_norm))
        logger.info("optimizer step: %s", "inside backward, one gradient alive at a time" if args.optimizer_in_backward
                    else "after backward (--optimizer_in_backward is off)")
        logger.info("frozen layers' weights: %s", f"up to {config.offload_frozen_layers} in host memory"
                    if config.offload_frozen_layers else "on the device (--lisa_offload_frozen_layers 0)")
        logger.info("frozen layers' optimizer state: %s", {"park": "parked in host memory", "reset": "dropped",
                                                           "keep": "kept on the device"}[config.state_policy])
        self.offload: FrozenWeightOffload | None = None  # while a controller holds the model, with layers offloaded
        self._given_embedding_sparse = getattr(embedding_module(model, "input"), "sparse", None)
        self._restore_checkpointing = None

    @staticmethod
    def check(config: LisaConfig, args: LisaTrainingArguments, processes: int) -> None:
        """The rules joining the LISA options, the training arguments and the number of processes."""
        if args.optimizer_in_backward and processes > 1:
            raise OptionError(LisaTrainingArguments, "optimizer_in_backward", f"runs in one process: under torchrun "
                              f"(WORLD_SIZE={processes}) the ranks' gradients are averaged after backward, after the "
                              f"update")
        if args.optimizer_in_backward and config.granularity == "module":
            raise OptionError(LisaTrainingArguments, "optimizer_in_backward", "steps each tensor inside backward, "
                              "where the module-wise sampling cannot measure the gradient norms it samples by; use "
                              "it with --lisa_granularity layer")
        if config.offload_frozen_layers and (processes > 1 or not args.gradient_checkpointing):
            raise OptionError(LisaConfig, "offload_frozen_layers", "needs gradient checkpointing "
                              "(--gradient_checkpointing: without it a layer's weights stay on the device from its "
                              "forward to its backward) and one process (each rank would copy its own)")

    # ------------------------------------------------------------------------------------------- the model
    def attach(self, controller) -> None:
        """Offload frozen layers' weights whenever `controller` freezes layers (`offload_frozen_layers`)."""
        if self.config.offload_frozen_layers:
            controller.register_freeze_hook(self._offload_frozen)

    def take_model(self) -> None:
        """Set the model up for training: gradient checkpointing (when asked for) and the input embedding's gradient.
        The controller sets `requires_grad` (and so, through `attach`, the offload)."""
        if self.args.gradient_checkpointing and self._restore_checkpointing is None:
            self._restore_checkpointing = enable_gradient_checkpointing(self.model)
        self._choose_embedding_grad()

    def release_model(self) -> None:
        """The model's weights all on their device (the offload closed), its input embedding's `sparse` flag and
        gradient checkpointing as they were given."""
        if self.offload is not None:
            self.offload.close()
            self.offload = None
        if self._restore_checkpointing is not None:
            self._restore_checkpointing()
            self._restore_checkpointing = None
        if self._given_embedding_sparse is not None:
            embedding_module(self.model, "input").sparse = self._given_embedding_sparse

    def after_backward(self) -> None:
        """The last offloaded layer a pass used goes back to host memory (see `lisa_trainer.frozen_weights`)."""
        if self.offload is not None:
            self.offload.release_all()

    @contextlib.contextmanager
    def weights_on_device(self):
        """Weights load into device tensors: offloaded layers come back for the load and leave again after it."""
        offloaded = self.offload.offloaded if self.offload is not None else ()
        if offloaded:
            self.offload.set_offloaded(())
        yield
        if offloaded:
            self.offload.set_offloaded(offloaded)

    def after_checkpoint_load(self) -> None:
        """A checkpoint's param groups say whether the embedding's state is row-sparse (a run saved under FSDP
        resumes with dense state): the gradient follows."""
        self._choose_embedding_grad()

    def _offload_frozen(self, controller) -> None:
        if self.offload is None:
            self.offload = FrozenWeightOffload(controller.layers)
        self.offload.set_offloaded(controller.frozen_layers[:self.config.offload_frozen_layers])

    def _choose_embedding_grad(self) -> None:
        use_sparse_embedding_grad(self.model, self.optimizer, self.config.sparse_embedding_grad,
                                  data_parallel=self.data_parallel)


def use_sparse_embedding_grad(model: nn.Module, optimizer: torch.optim.Optimizer, enabled: bool, *,
                              data_parallel: bool) -> bool:
    """Set the input embedding module's ``sparse`` flag: True when `enabled`, the optimizer is FusedAdamW with the
    embedding in a ``sparse_rows`` group (not tied to the head, not FSDP) and the run is one process (under data
    parallelism the bucketed all-reduce takes dense gradients), else False. Logs which gradient the embedding gets;
    returns whether it is sparse. A module without a ``sparse`` flag (not an ``nn.Embedding``) stays as it is."""
    module = embedding_module(model, "input")
    weight = getattr(module, "weight", None)
    if not isinstance(weight, nn.Parameter):
        return False
    row_sparse = isinstance(optimizer, FusedAdamW) and any(
        group["sparse_rows"] and any(p is weight for p in group["params"]) for group in optimizer.param_groups)
    reason = None
    if not enabled:
        reason = "sparse_embedding_grad is off"
    elif not row_sparse:
        reason = "its optimizer state is not FusedAdamW's row-sparse state (tied to the head, FSDP, another optim)"
    elif data_parallel:
        reason = "data-parallel: the gradient all-reduce takes dense gradients"
    elif not isinstance(getattr(module, "sparse", None), bool):
        reason = f"{type(module).__name__} has no `sparse` flag (not an nn.Embedding)"
    if isinstance(getattr(module, "sparse", None), bool):
        module.sparse = reason is None
    logger.info("input embedding %s: %s gradient%s", tuple(weight.shape), "dense" if reason else "row-sparse",
                f" ({reason})" if reason else " (tokens x hidden values, stepped in its row-sparse state)")
    return reason is None


class BackwardThenStep:
    """The usual step: backward for each micro-batch (`parallel` communicates the gradients in the last one), then
    the gradients clipped (`max_norm` > 0; the norm is measured either way, sparse gradients included) and one
    optimizer step, skipped when the loss or the norm is not finite."""

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float):
        self.optimizer, self.max_norm = optimizer, max_norm

    def backward(self, loss: torch.Tensor, loss_value: float, parallel, *, last: bool) -> None:
        parallel.backward(loss, last=last)

    def step(self, model: nn.Module, loss_total: float) -> tuple[float, bool]:
        """(gradient norm, whether the step was taken)."""
        grad_norm = clip_grad_norm([p for p in model.parameters() if p.grad is not None], self.max_norm)
        finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
        if finite:
            self.optimizer.step()
        return grad_norm, finite


class StepInsideBackward:
    """`optimizer_in_backward`: each trainable tensor is updated as soon as its gradient is complete, and the
    gradient freed (`lisa_kernels.StepInBackward`; one process, one micro-batch per step). The hooks go on the
    tensors that train now (after the controller's switch and the learning rate are set) and come off after
    backward. A non-finite loss skips the backward, and so the whole step, as a step after backward would; a
    non-finite gradient skips its own tensor's update, the tensors updated before it in that backward stay updated."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer = optimizer
        self._stepping: StepInBackward | None = None

    def backward(self, loss: torch.Tensor, loss_value: float, parallel, *, last: bool) -> None:
        self._stepping = None
        if math.isfinite(loss_value):
            with StepInBackward(self.optimizer) as stepping:
                loss.backward()
            self._stepping = stepping

    def step(self, model: nn.Module, loss_total: float) -> tuple[float, bool]:
        stepping, self._stepping = self._stepping, None
        if stepping is None:  # the loss was not finite: no backward ran
            return math.nan, False
        grad_norm = float(stepping.grad_norm())
        return grad_norm, math.isfinite(loss_total) and math.isfinite(grad_norm) and stepping.finite
