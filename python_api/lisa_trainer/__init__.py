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

from .arguments import STATE_POLICIES, LisaConfig
from .controller import LisaController
from .optimizers import build_optimizer
from .layers import always_trainable_modules, find_decoder_layers, layer_candidates
from .sampler import LayerSampler

__all__ = [
    "LisaConfig",
    "LisaController",
    "LayerSampler",
    "LisaCallback",
    "LisaTrainer",
    "LisaTrainingArguments",
    "build_optimizer",
    "find_decoder_layers",
    "always_trainable_modules",
    "layer_candidates",
    "STATE_POLICIES",
]


# These import transformers, which costs seconds, so they load only when asked for.
_LAZY = {"LisaCallback": "callback", "LisaTrainer": "trainer", "LisaTrainingArguments": "arguments"}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
