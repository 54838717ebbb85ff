"""LISA for an existing `transformers.Trainer` script, in two lines.

```python
from lisa_trainer import LisaCallback

lisa = LisaCallback(n_active_layers=2, interval_steps=20)                       # line 1
trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[lisa])   # line 2
trainer.train()
```

The callback creates a `LisaController` when training begins and drives it from the Trainer's step events: the
layer switch happens in `on_step_begin` (before the first micro-batch of an optimizer step, so gradient
accumulation is fine), the period bookkeeping in `on_step_end`. With the "park" policy it attaches a
`lisa_kernels.StateParker` to whatever optimizer the Trainer built (`optim="adamw_torch"`, `"adamw_torch_fused"`,
`"adafactor"`, ...), so frozen layers' state lives in host memory. After training, `lisa.controller.period_log`
holds the layers and per-layer weight-update norms of every period.

The fast path: `optimizers=(LisaCallback.optimizer_for(model, args), None)` trains with `lisa_kernels.FusedAdamW`
(fp32 moments for bf16 weights, one launch for all active tensors). Its parker exists before the Trainer loads a
checkpoint, so a resumed run loads every layer's state straight into host memory; the Trainer's own optimizer is
built and loaded before any callback runs, so there the loaded state passes through the device once.

A peft (LoRA) model is refused when the Trainer is built: LISA trains full weights, which peft's adapter-only
`save_pretrained` would drop. Merge the adapters first (`model = model.merge_and_unload()`).

Resuming (`trainer.train(resume_from_checkpoint=...)`) continues the same layer schedule (a pure function of
(seed, period)) and the period log: the callback's state is saved in each checkpoint's `trainer_state.json`.
With several processes (``torchrun`` or ``accelerate launch``: the Trainer's DDP), nothing needs setting: when
the Trainer is built the callback leaves DDP a single always-trainable parameter and all-reduces the rest of the
trainable set itself (`gradient_sync.TrainerDataParallel`), so frozen layers cost no communication, there is no
``find_unused_parameters`` traversal, and gradient checkpointing (reentrant or not) and any
``ddp_find_unused_parameters`` work. Every rank checks at each switch that it samples the same layers, and the
bytes all-reduced per optimizer step reach the Trainer's logs as ``lisa/allreduce_bytes``. Pass the callback in
``Trainer(callbacks=[...])``: one added later with ``trainer.add_callback`` leaves the whole model to DDP (which
then needs ``ddp_find_unused_parameters=True``).
"""

from __future__ import annotations

import dataclasses
import inspect
import warnings

from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import CallbackHandler, ExportableState
from transformers.training_args import ParallelMode

from lisa_kernels import FusedAdamW, StateParker

from .arguments import LisaConfig
from .controller import LisaController, OptimizerMissesParameters
from .gradient_sync import TrainerDataParallel
from .layers import always_trainable_modules, refuse_peft_model, unique_parameters
from .memory import check_callback_config
from .optimizers import build_optimizer, unwrap_optimizer
from .options import OptionError

__all__ = ["LisaCallback"]

GRADIENT_SYNCS = ("active", "ddp")
ALLREDUCE_LOG_KEY = "lisa/allreduce_bytes"


class LisaCallback(TrainerCallback, ExportableState):
    """A `TrainerCallback` that runs LISA: `LisaCallback(cfg)` or `LisaCallback(n_active_layers=2, ...)`.

    `gradient_sync` (with several processes): "active" (default) all-reduces the trainable set only; "ddp" leaves
    the whole model to the Trainer's DDP, which then needs ``ddp_find_unused_parameters=True`` and all-reduces
    every layer's gradient, zeros included, in every step (the usual way, kept for comparison).
    """

    def __init__(self, config: LisaConfig | None = None, *, gradient_sync: str = "active", **config_fields):
        if config is not None and config_fields:
            raise TypeError("pass either a LisaConfig or LisaConfig fields as keywords, not both")
        if config is not None and not isinstance(config, LisaConfig):
            raise TypeError(f"config must be a LisaConfig, got {type(config).__name__}")
        self.config = config if config is not None else LisaConfig(**config_fields)
        check_callback_config(self.config)
        if gradient_sync not in GRADIENT_SYNCS:
            raise ValueError(f"LisaCallback: gradient_sync must be one of {', '.join(GRADIENT_SYNCS)}, "
                             f"got {gradient_sync!r}")
        self.gradient_sync = gradient_sync
        self.controller: LisaController | None = None
        self.data_parallel: TrainerDataParallel | None = None
        self._sent = [0, 0]  # bytes all-reduced, optimizer steps: since the last log
        self._resume_state: dict | None = None  # the controller state a checkpoint saved, set by the Trainer

    @staticmethod
    def optimizer_for(trainer_or_model, args=None, cfg: LisaConfig | None = None, **adamw_kwargs):
        """A FusedAdamW over all parameters for `Trainer(optimizers=(opt, None))`.

        `trainer_or_model`: a model (then `args`, a `TrainingArguments`, supplies lr, weight decay, betas and eps)
        or an already constructed Trainer (its model and args are used and the optimizer is also installed as
        `trainer.optimizer`, which Trainer uses instead of building its own). Keyword arguments override.
        """
        trainer = None
        if hasattr(trainer_or_model, "args") and hasattr(trainer_or_model, "create_optimizer"):
            trainer = trainer_or_model
            model, args = trainer.model, trainer.args if args is None else args
        else:
            model = trainer_or_model
        kwargs = {}
        if args is not None:
            kwargs = {"lr": args.learning_rate, "weight_decay": args.weight_decay,
                      "betas": (args.adam_beta1, args.adam_beta2), "eps": args.adam_epsilon}
        kwargs.update(adamw_kwargs)
        optimizer = build_optimizer(model, cfg, **kwargs)
        if trainer is not None:
            trainer.optimizer = optimizer
        return optimizer

    # ------------------------------------------------------------------------------------ Trainer checkpoints
    def state(self) -> dict:
        """What the Trainer stores in `trainer_state.json` at each save (ExportableState)."""
        return {"args": {**_config_arguments(self.config), "gradient_sync": self.gradient_sync},
                "attributes": {"_resume_state": None if self.controller is None else self.controller.state_dict()}}

    def _saved_state(self, state) -> dict | None:
        """The controller state of the checkpoint being resumed: set on this callback by the Trainer (with
        `restore_callback_states_from_checkpoint`) or read from the resumed `trainer_state.json`."""
        if self._resume_state is not None:
            return self._resume_state
        saved = (getattr(state, "stateful_callbacks", None) or {}).get(type(self).__name__)
        return saved.get("attributes", {}).get("_resume_state") if isinstance(saved, dict) else None

    # ------------------------------------------------------------------------------------------ Trainer events
    def on_init_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is not None:  # refused when the Trainer is built, whichever optimizer it will use
            refuse_peft_model(model)
            self._before_ddp_wraps(args, model)
        if optimizer is None:
            return
        optim = _optim_name(args.optim)
        if optim != _optim_name(TrainingArguments.__dataclass_fields__["optim"].default):
            warnings.warn(f"TrainingArguments(optim={optim!r}) is not used: "
                          f"Trainer(optimizers=...) supplies {type(unwrap_optimizer(optimizer)).__name__}. Drop "
                          f"optimizers= to train (and park) with the optimizer optim= names.", stacklevel=2)
        if self.config.state_policy == "park":
            # Attached before the Trainer loads a checkpoint: every layer's loaded state goes to host memory, and
            # each comes back at the first step that trains it (peak memory at resume equals steady state).
            StateParker.of(unwrap_optimizer(optimizer)).park_on_load = "all"

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("LisaCallback needs the model and optimizer from the Trainer at on_train_begin")
        self._start_data_parallel(args, model, optimizer)  # before the controller freezes layers
        try:
            self.controller = LisaController(model, optimizer, self.config, start_step=state.global_step)
        except OptimizerMissesParameters as err:
            name = type(unwrap_optimizer(optimizer)).__name__
            raise ValueError(
                f"LisaCallback: the Trainer's optimizer ({name}) does not hold {err.count} parameters that LISA "
                f"trains (e.g. {err.example!r}). LISA needs an optimizer that keeps each parameter (and its state) "
                f"separately, built over every parameter: leave all parameters trainable before trainer.train() "
                f"and use TrainingArguments(optim='adamw_torch'), 'adamw_torch_fused' or 'adafactor', or pass "
                f"Trainer(optimizers=(LisaCallback.optimizer_for(model, args), None))"
            ) from None
        saved = self._saved_state(state)
        if saved is not None:
            self.controller.load_state_dict(saved)
        self._resume_state = None

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.on_step_begin(state.global_step)
        if self.data_parallel is not None:
            self.data_parallel.on_step_begin(self.controller)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        if self.data_parallel is not None:  # the step's gradients are all-reduced: never step on unsynced ones
            self._sent[0] += self.data_parallel.step_bytes()
            self._sent[1] += 1

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer has already counted the step it just finished.
        self.controller.on_step_end(state.global_step - 1)

    def on_log(self, args, state, control, logs=None, **kwargs):
        """The mean bytes all-reduced per optimizer step since the last log, as ``lisa/allreduce_bytes``."""
        if self.data_parallel is None or logs is None or not self._sent[1]:
            return
        logs[ALLREDUCE_LOG_KEY] = self._sent[0] / self._sent[1]
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1][ALLREDUCE_LOG_KEY] = logs[ALLREDUCE_LOG_KEY]  # the Trainer's copy of `logs`
        self._sent = [0, 0]

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.finish(state.global_step - 1)
            self.controller.release_model()  # requires_grad as the model had it before training
        if self.data_parallel is not None:
            self.data_parallel.close()

    # ------------------------------------------------------------------------------------- data parallelism
    def _before_ddp_wraps(self, args, model) -> None:
        """When the Trainer is built, before train() wraps the model in DDP: leave DDP one parameter."""
        if _trainer_sharding(args) != "ddp":
            return
        if self.gradient_sync == "active":
            TrainerDataParallel.keep_out_of_ddp(model, self._ddp_kept_parameter(model))
        _run_first(self)

    def _start_data_parallel(self, args, model, optimizer) -> None:
        """At train start, before LISA freezes anything (DDP holds what trains now): refuse what cannot train,
        else start the gradient all-reduce of the trainable set (or only count DDP's bytes)."""
        sharding = _trainer_sharding(args)
        if sharding in ("fsdp1", "fsdp2"):
            self._check_fsdp(sharding, optimizer)
        if sharding != "ddp":
            return
        kept = TrainerDataParallel.kept_parameter(model) if self.gradient_sync == "active" else None
        if kept is None and not _ddp_finds_unused(args, model):
            raise ValueError(self._whole_model_ddp_problem(args))
        self.data_parallel = TrainerDataParallel(model, kept)
        self._sent = [0, 0]

    def _ddp_kept_parameter(self, model) -> str:
        """The name of the smallest always-trainable parameter: the one DDP keeps (it has a gradient each step)."""
        modules = always_trainable_modules(model, self.config.always_trainable, self.config.layers_attribute)
        params = unique_parameters(modules.values())
        if not params:
            raise OptionError(LisaConfig, "always_trainable", "is empty, but under DDP LisaCallback needs one module "
                              "that trains in every step (e.g. the default, which includes the final norm)")
        smallest = min(params, key=lambda p: p.numel())
        return next(name for name, p in model.named_parameters() if p is smallest)

    def _check_fsdp(self, sharding: str, optimizer) -> None:
        """FSDP2 shards each parameter (a DTensor per layer), which LISA freezes and parks shard by shard; FSDP1
        flattens a unit's parameters into one, which no per-layer freezing can reach."""
        if sharding == "fsdp1":
            raise ValueError("LisaCallback needs FSDP2, but the Trainer shards with FSDP1, whose flattened "
                             "parameters cannot be frozen layer by layer. Fix: set fsdp_version: 2 in the accelerate "
                             "config file (fsdp_config: fsdp_version: 2), or TrainingArguments(fsdp_config="
                             "{'version': 2})")
        if self.config.state_policy == "park" and not isinstance(unwrap_optimizer(optimizer), FusedAdamW):
            name = type(unwrap_optimizer(optimizer)).__name__
            raise ValueError(f"LisaCallback under FSDP2 parks sharded optimizer state with FusedAdamW only, not the "
                             f"Trainer's {name}. Fix: Trainer(optimizers=(LisaCallback.optimizer_for(model, args), "
                             f"None)), or LisaCallback(state_policy='keep') / 'reset'")

    def _whole_model_ddp_problem(self, args) -> str:
        if self.gradient_sync == "ddp":
            why, fixes = ("LisaCallback(gradient_sync='ddp') leaves the whole model to the Trainer's DDP",
                          "set TrainingArguments(ddp_find_unused_parameters=True), or drop gradient_sync='ddp'")
        else:
            why, fixes = ("LisaCallback was added after the Trainer was built (trainer.add_callback), too late to "
                          "keep the layers it freezes out of the Trainer's DDP",
                          "pass it as Trainer(callbacks=[LisaCallback(...)]), or set "
                          "TrainingArguments(ddp_find_unused_parameters=True)")
        setting = ("ddp_find_unused_parameters=False" if args.ddp_find_unused_parameters is False else
                   "ddp_find_unused_parameters unset, which the Trainer turns to False with gradient checkpointing")
        return (f"{why}; with {setting}, DDP would wait for the frozen layers' gradients and fail at the second "
                f"step. Fix: {fixes}")


def _config_arguments(config: LisaConfig) -> dict:
    """LisaConfig fields as JSON values (tuples as lists), enough to build the callback again."""
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
            for f in dataclasses.fields(config)}


def _trainer_sharding(args) -> str | None:
    """How the Trainer's accelerator spreads the model over several processes: "ddp", "fsdp1", "fsdp2", another
    accelerate distributed type's name (DeepSpeed, ...), or None in one process."""
    if args.parallel_mode != ParallelMode.DISTRIBUTED or args.world_size <= 1:
        return None
    from accelerate.state import AcceleratorState
    from accelerate.utils import DistributedType

    state = AcceleratorState()  # the Trainer's (a shared state): its FSDP config file or fsdp= arguments
    if state.distributed_type == DistributedType.FSDP:
        return f"fsdp{state.fsdp_plugin.fsdp_version}"
    kind = str(state.distributed_type.value)
    return "ddp" if kind.startswith("MULTI_") else kind.lower()  # MULTI_GPU, MULTI_CPU, ...: accelerate's DDP


def _ddp_finds_unused(args, model) -> bool:
    """The Trainer's `find_unused_parameters` for its DDP: the user's setting, else off with checkpointing."""
    if args.ddp_find_unused_parameters is not None:
        return args.ddp_find_unused_parameters
    checkpointing = (getattr(args, "activation_checkpointing", False) or args.gradient_checkpointing
                     or getattr(model, "is_activation_checkpointing", False)
                     or getattr(model, "is_gradient_checkpointing", False))
    return not checkpointing


def _run_first(callback) -> None:
    """Move `callback`, being called from the Trainer's CallbackHandler (a caller up the stack), to the front of
    its list, so that what it adds to the logs in `on_log` reaches the reporting integrations (TensorBoard, W&B,
    ...), which the Trainer lists before the user's callbacks. Moving the element being visited to the front leaves
    the handler's loop on the same next element."""
    frame = inspect.currentframe()
    while frame is not None and not isinstance(frame.f_locals.get("self"), CallbackHandler):
        frame = frame.f_back
    if frame is not None and callback in frame.f_locals["self"].callbacks:
        handler = frame.f_locals["self"]
        handler.callbacks.remove(callback)
        handler.callbacks.insert(0, callback)


def _optim_name(optim) -> str:
    return str(getattr(optim, "value", optim))  # an OptimizerNames member or a plain string
