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
With several processes (DDP), every rank picks the same layers from the same seed; DDP must be told that frozen
layers produce no gradients: `TrainingArguments(ddp_find_unused_parameters=True)`.
"""

from __future__ import annotations

import dataclasses
import warnings

from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_callback import ExportableState

from lisa_kernels import StateParker

from .controller import LisaConfig, LisaController, OptimizerMissesParameters, _unwrap_optimizer, build_optimizer
from .layers import refuse_peft_model
from .options import OptionError

__all__ = ["LisaCallback"]


class LisaCallback(TrainerCallback, ExportableState):
    """A `TrainerCallback` that runs LISA: `LisaCallback(cfg)` or `LisaCallback(n_active_layers=2, ...)`."""

    def __init__(self, config: LisaConfig | None = None, **config_fields):
        if config is not None and config_fields:
            raise TypeError("pass either a LisaConfig or LisaConfig fields as keywords, not both")
        if config is not None and not isinstance(config, LisaConfig):
            raise TypeError(f"config must be a LisaConfig, got {type(config).__name__}")
        self.config = config if config is not None else LisaConfig(**config_fields)
        if self.config.offload_frozen_layers:
            raise OptionError(LisaConfig, "offload_frozen_layers", "is for LisaTrainer / lisa-finetune, which hand "
                              "the weights back to host memory after each backward; LisaCallback leaves that to "
                              "the Trainer, which does not")
        self.controller: LisaController | None = None
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
        return {"args": _config_arguments(self.config),
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
        if optimizer is None:
            return
        optim = _optim_name(args.optim)
        if optim != _optim_name(TrainingArguments.__dataclass_fields__["optim"].default):
            warnings.warn(f"TrainingArguments(optim={optim!r}) is not used: "
                          f"Trainer(optimizers=...) supplies {type(_unwrap_optimizer(optimizer)).__name__}. Drop "
                          f"optimizers= to train (and park) with the optimizer optim= names.", stacklevel=2)
        if self.config.state_policy == "park":
            # Attached before the Trainer loads a checkpoint: every layer's loaded state goes to host memory, and
            # each comes back at the first step that trains it (peak memory at resume equals steady state).
            StateParker.of(_unwrap_optimizer(optimizer)).park_on_load = "all"

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("LisaCallback needs the model and optimizer from the Trainer at on_train_begin")
        if getattr(args, "world_size", 1) > 1 and getattr(args, "ddp_find_unused_parameters", None) is False:
            warnings.warn("LISA freezes layers, so DDP needs ddp_find_unused_parameters=True", stacklevel=2)
        try:
            self.controller = LisaController(model, optimizer, self.config, start_step=state.global_step)
        except OptimizerMissesParameters as err:
            name = type(_unwrap_optimizer(optimizer)).__name__
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

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer has already counted the step it just finished.
        self.controller.on_step_end(state.global_step - 1)

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.finish(state.global_step - 1)
            self.controller.release_model()  # requires_grad as the model had it before training


def _config_arguments(config: LisaConfig) -> dict:
    """LisaConfig fields as JSON values (tuples as lists), enough to build the callback again."""
    return {f.name: list(v) if isinstance(v := getattr(config, f.name), tuple) else v
            for f in dataclasses.fields(config)}


def _optim_name(optim) -> str:
    return str(getattr(optim, "value", optim))  # an OptimizerNames member or a plain string
