"""The LISA trainer API: layer sampling, the Hugging Face Trainer callback, a training loop and `lisa-finetune`.

```python
from lisa_trainer import LisaConfig, LisaController, build_optimizer

cfg = LisaConfig(n_active_layers=2, interval_steps=20, state_policy="park")
optimizer = build_optimizer(model, cfg, lr=1e-5)          # FusedAdamW over ALL parameters
controller = LisaController(model, optimizer, cfg)        # freezes all but period 0's layers + always-on
for step in range(max_steps):
    controller.on_step_begin(step)
    loss = model(**batch).loss; loss.backward()
    optimizer.step(); optimizer.zero_grad(set_to_none=True)
    controller.on_step_end(step)
```
"""

from .controller import STATE_POLICIES, LisaConfig, LisaController, build_optimizer
from .layers import always_trainable_modules, find_decoder_layers, layer_candidates
from .sampler import LayerSampler

__all__ = [
    "LisaConfig",
    "LisaController",
    "LayerSampler",
    "LisaCallback",
    "build_optimizer",
    "find_decoder_layers",
    "always_trainable_modules",
    "layer_candidates",
    "STATE_POLICIES",
]


def __getattr__(name):
    # LisaCallback subclasses transformers.TrainerCallback; importing transformers costs seconds, so it is loaded
    # only when asked for.
    if name == "LisaCallback":
        from .callback import LisaCallback

        return LisaCallback
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
