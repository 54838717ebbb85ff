"""LISA for an existing `transformers.Trainer` script, in two lines.

```python
from lisa_trainer import LisaCallback

lisa = LisaCallback(n_active_layers=2, interval_steps=20)                        # line 1
trainer = Trainer(model=model, args=args, train_dataset=ds,
                  callbacks=[lisa], optimizers=(LisaCallback.optimizer_for(model, args), None))  # line 2
trainer.train()
```

`optimizer_for` builds a `lisa_kernels.FusedAdamW` over all the model's parameters with the learning rate, weight
decay, betas and epsilon of the `TrainingArguments`; the Trainer still builds its own lr scheduler. The callback
creates a `LisaController` when training begins and drives it from the Trainer's step events: the layer switch
happens in `on_step_begin` (before the first micro-batch of an optimizer step, so gradient accumulation is fine),
the period bookkeeping in `on_step_end`. After training, `lisa.controller.period_log` holds the layers and
per-layer weight-update norms of every period.

Resuming (`trainer.train(resume_from_checkpoint=...)`) continues the same layer schedule: it is a pure function of
(seed, period) and the period comes from `state.global_step`. The period log restarts with the resumed run.
With several processes (DDP), every rank picks the same layers from the same seed; DDP must be told that frozen
layers produce no gradients: `TrainingArguments(ddp_find_unused_parameters=True)`.
"""

from __future__ import annotations

import warnings

from transformers import TrainerCallback

from .controller import LisaConfig, LisaController, build_optimizer

__all__ = ["LisaCallback"]


class LisaCallback(TrainerCallback):
    """A `TrainerCallback` that runs LISA: `LisaCallback(cfg)` or `LisaCallback(n_active_layers=2, ...)`."""

    def __init__(self, config: LisaConfig | None = None, **config_fields):
        if config is not None and config_fields:
            raise TypeError("pass either a LisaConfig or LisaConfig fields as keywords, not both")
        if config is not None and not isinstance(config, LisaConfig):
            raise TypeError(f"config must be a LisaConfig, got {type(config).__name__}")
        self.config = config if config is not None else LisaConfig(**config_fields)
        self.controller: LisaController | None = None

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

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if model is None or optimizer is None:
            raise RuntimeError("LisaCallback needs the model and optimizer from the Trainer at on_train_begin")
        if getattr(args, "world_size", 1) > 1 and getattr(args, "ddp_find_unused_parameters", None) is False:
            warnings.warn("LISA freezes layers, so DDP needs ddp_find_unused_parameters=True", stacklevel=2)
        self.controller = LisaController(model, optimizer, self.config, start_step=state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.controller.on_step_begin(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        # The Trainer has already counted the step it just finished.
        self.controller.on_step_end(state.global_step - 1)

    def on_train_end(self, args, state, control, **kwargs):
        if self.controller is not None:
            self.controller.finish(state.global_step - 1)
