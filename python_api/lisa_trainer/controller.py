"""The LISA controller: which layers train when, and what happens to their optimizer state at a switch.

At each period start it toggles `requires_grad` (and sets frozen layers' `.grad` to None: a zero gradient would
still move a weight through AdamW's momentum and weight decay), applies the state policy to the layers leaving the
active set through the optimizer's `StateParker` ("park": into the host bank, "reset": forgotten, "keep": left on
the device), prefetches the next period's parked state `prefetch_steps` before the switch, and at each period's
end records per-layer weight-update norms (`lisa_trainer.update_norms`). What else follows a switch (the frozen
layers' weights moving to host memory: `lisa_trainer.memory`) hooks in with `register_freeze_hook`.

The optimizer must hold every parameter (checked), so a layer frozen when the optimizer is built still trains when
it is sampled; the schedule is a pure function of (seed, period), so ranks and resumed runs agree without talking.

With `granularity="module"` the unit switched is a module inside a decoder layer instead of a whole layer; the
schedule is then a pure function of (seed, period, the period log), whose per-module gradient norms an optimizer
step pre-hook measures, and which every checkpoint holds, with the open period's sums so far.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from lisa_kernels import StateParker
from lisa_kernels.optimizer import local_tensor

from .arguments import LisaConfig
from .layers import always_trainable_modules, decoder_modules, find_decoder_layers, refuse_peft_model, unique_parameters
from .optimizers import unwrap_optimizer
from .options import OptionError
from .sampler import LayerSampler, ModuleSampler, auto_layer_weights, module_importance, outlier_layer_weights
from .update_norms import GradientNorms, UpdateNorms

__all__ = ["LisaController", "OptimizerMissesParameters"]

logger = logging.getLogger(__name__)
_STATE_DICT_FORMAT = 1


class OptimizerMissesParameters(ValueError):
    """The optimizer does not hold parameters that LISA trains (built over trainable ones only, or flattened)."""

    def __init__(self, message: str, count: int, example: str):
        super().__init__(message)
        self.count, self.example = count, example


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself, not a DistributedDataParallel/FSDP `.module` or torch.compile `._orig_mod` wrapper: the
    parameters are the same objects, but only the model has `get_input_embeddings` and the familiar paths."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


class LisaController:
    """Drives LISA on `model` with `optimizer` (which must hold every parameter of the model that LISA trains).

    Call `on_step_begin(step)` before each optimizer step's forward pass and `on_step_end(step)` after
    `optimizer.step()`; `step` counts optimizer steps from 0. Construction freezes everything except the starting
    period's layers and the always-trainable modules; pass `start_step` when resuming (or use `load_state_dict`).
    The controller owns `requires_grad` of every parameter: parameters that are neither in the decoder layers nor
    always trainable stay frozen (list them with `frozen_parameter_names`). `release_model()` gives the model back
    as it was given (after training, or when it fails).

    With DistributedDataParallel, wrap the model before constructing the controller (DDP leaves parameters that
    do not require grad at wrap time out of its gradient all-reduce for good, so a layer frozen then would train
    unsynchronised on each rank later) and pass `find_unused_parameters=True` (frozen layers produce no
    gradients). The controller may be given the wrapper or the model.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, config: LisaConfig, *, start_step: int = 0):
        if not isinstance(config, LisaConfig):
            raise TypeError(f"config must be a LisaConfig, got {type(config).__name__}")
        if not isinstance(start_step, int) or isinstance(start_step, bool) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        self.model = model = _unwrap_model(model)
        refuse_peft_model(model)
        self.config = config
        self.optimizer = optimizer
        self._opt = unwrap_optimizer(optimizer)

        self.layers_path, self.layers = find_decoder_layers(model, config.layers_attribute)
        self.n_layers = len(self.layers)
        if config.n_active_layers > self.n_layers:
            raise OptionError(LisaConfig, "n_active_layers", f"({config.n_active_layers}) exceeds the model's "
                              f"{self.n_layers} decoder layers (at {self.layers_path!r})")
        if config.layer_weights == "outlier":  # once, from the weights as they are when training starts
            fixed_weights = outlier_layer_weights(self.layers)
            logger.info("layer_weights='outlier': %s", "uniform (no layer has outlier weights)" if fixed_weights is None
                        else ", ".join(f"{w:.3f}" for w in fixed_weights))
        else:
            fixed_weights = None if config.layer_weights == "auto" else config.layer_weights
        if fixed_weights is not None and len(fixed_weights) != self.n_layers:
            raise OptionError(LisaConfig, "layer_weights", f"has {len(fixed_weights)} entries but the model has "
                              f"{self.n_layers} decoder layers (at {self.layers_path!r})")
        self.sampler = LayerSampler(self.n_layers, config.n_active_layers, config.seed, fixed_weights,
                                    mode=config.sampling)

        self.always_trainable = always_trainable_modules(model, config.always_trainable, self.layers_path)
        self._layer_params = [unique_parameters([layer]) for layer in self.layers]
        # The sampling units: whole layers, or the modules inside them. `_active` holds unit indices.
        self.module_sampler = None
        if config.granularity == "module":
            self.module_names, self._unit_params, self._unit_layer = decoder_modules(self.layers)
            sizes = [sum(p.numel() for p in ps) for ps in self._unit_params]
            layer_size = sum(p.numel() for p in self._layer_params[0])
            budget = config.module_budget or config.n_active_layers * layer_size
            if budget < max(sizes):
                raise OptionError(LisaConfig, "module_budget", f"({budget:,}) is smaller than the largest decoder "
                                  f"module ({max(sizes):,} parameters), which could then never train")
            self.module_sampler = ModuleSampler(sizes, budget, config.seed)
            self._module_index = {name: u for u, name in enumerate(self.module_names)}
        else:
            self.module_names = None
            self._unit_params, self._unit_layer = self._layer_params, list(range(self.n_layers))
        self._always_params_by_module = unique_parameters(self.always_trainable.values(), per_module=True)
        self._always_params = [p for ps in self._always_params_by_module for p in ps]
        managed = {id(p) for ps in self._layer_params for p in ps} | {id(p) for p in self._always_params}
        self._other_params = [p for p in model.parameters() if id(p) not in managed]
        self._names = {id(p): n for n, p in model.named_parameters()}

        self._check_optimizer()
        self._given_requires_grad = [(p, p.requires_grad) for p in model.parameters()]
        self._holds_model = False
        self._freeze_hooks = []
        self.parker = StateParker.of(self._opt) if config.state_policy in ("park", "reset") else None
        if config.state_policy == "park":
            # Create the host state bank now: its first creation on a machine builds the native arena (~10 s), which
            # would otherwise stall the first switch's step.
            self.parker.bank
        self._period: int | None = None
        self._active: tuple[int, ...] = ()
        self._prefetched_for: int | None = None
        self.update_norms = UpdateNorms(self._names, config.track_update_norms)
        self.period_log: list[dict] = []
        self.gradient_norms = None if self.module_sampler is None else GradientNorms(self._opt, self._measured_groups)
        self._enter_period(start_step // config.interval_steps, enforce_all=True)

    # ----------------------------------------------------------------------------------------------- public API
    @property
    def active_layers(self) -> tuple[int, ...]:
        """Indices of the decoder layers training in the current period (with granularity="module": those holding
        at least one active module)."""
        return tuple(sorted({self._unit_layer[u] for u in self._active}))

    @property
    def frozen_layers(self) -> tuple[int, ...]:
        """Indices of the decoder layers with nothing to train in the current period."""
        touched = set(self.active_layers)
        return tuple(i for i in range(self.n_layers) if i not in touched)

    @property
    def active_modules(self) -> tuple[str, ...] | None:
        """Names of the modules training in the current period ("<layer>.<path>"); None with whole layers."""
        return None if self.module_names is None else tuple(self.module_names[u] for u in self._active)

    @property
    def n_units(self) -> int:
        """How many units the schedule chooses from: decoder layers, or decoder modules with granularity="module"."""
        return len(self._unit_params)

    @property
    def unit_name(self) -> str:
        """What the units are, for messages: "layers", or "modules" with granularity="module"."""
        return "layers" if self.module_names is None else "modules"

    @property
    def active_units(self) -> tuple[int, ...]:
        """Indices of this period's units (layers or modules, as `n_units` counts them)."""
        return self._active

    @property
    def period(self) -> int | None:
        return self._period

    @property
    def frozen_parameter_names(self) -> list[str]:
        """Parameters outside the decoder layers and the always-trainable modules: frozen for the whole run."""
        return [self._names.get(id(p), "?") for p in self._other_params]

    def layer_parameters(self, index: int) -> list[nn.Parameter]:
        return list(self._layer_params[index])

    def layers_for_period(self, period: int) -> tuple[int, ...]:
        """The layers of `period`: the sampler's answer, given the importance weights observed so far with "auto";
        with granularity="module", the layers holding that period's modules."""
        if self.module_sampler is not None:
            return tuple(sorted({self._unit_layer[u] for u in self.units_for_period(period)}))
        weights = None
        if self.config.layer_weights == "auto":
            weights = auto_layer_weights(self.period_log, self.n_layers, period)
        return self.sampler.layers_for_period(period, weights)

    def units_for_period(self, period: int) -> tuple[int, ...]:
        """The units (layer or module indices) of `period`: a pure function of (seed, period, the period log)."""
        if self.module_sampler is None:
            return self.layers_for_period(period)
        weights = module_importance(self.period_log, self._module_index, period)
        return self.module_sampler.modules_for_period(period, weights)

    def on_step_begin(self, step: int) -> None:
        """Switch layers when `step` starts a new period; prefetch the next period's state when it is near."""
        if not self._holds_model:  # after release_model(): training goes on
            self._take_model()
        period = step // self.config.interval_steps
        if period != self._period:
            self._close_period(last_step=step - 1)
            self._enter_period(period)
        if self.update_norms.opened is None:
            self.update_norms.open(self._period, step, self._tracked())
        self._maybe_prefetch(step)

    def on_step_end(self, step: int) -> None:
        """After `optimizer.step()`: close the period (record update norms) when `step` is its last step."""
        if (step + 1) % self.config.interval_steps == 0:
            self._close_period(last_step=step)

    def finish(self, last_step: int) -> None:
        """Record the current period's update norms when training stops in the middle of a period."""
        self._close_period(last_step=last_step)

    def register_freeze_hook(self, hook) -> None:
        """`hook(controller)` runs each time the controller has set `requires_grad` for a period: at construction,
        at each switch, at a resume and when it takes the model again after `release_model` (e.g. to move the
        frozen layers' weights off the device: `lisa_trainer.memory`)."""
        self._freeze_hooks.append(hook)
        if self._holds_model:
            hook(self)

    def release_model(self) -> None:
        """Give the model back as it was given: every parameter's `requires_grad` as at construction. The next
        `on_step_begin` takes it again, so training can go on."""
        for p, requires_grad in self._given_requires_grad:
            p.requires_grad_(requires_grad)
        self._holds_model = False

    def state_dict(self) -> dict:
        """Plain ints, floats, strings and lists: safe for `torch.load(weights_only=True)` and JSON."""
        c = self.config
        return {
            "format": _STATE_DICT_FORMAT,
            "seed": c.seed,
            "n_layers": self.n_layers,
            "n_active_layers": c.n_active_layers,
            "interval_steps": c.interval_steps,
            "layer_weights": c.layer_weights if c.layer_weights is None or isinstance(c.layer_weights, str)
            else list(c.layer_weights),
            "sampling": c.sampling,
            "granularity": c.granularity,
            "module_budget": None if self.module_sampler is None else self.module_sampler.budget,
            "layers_attribute": self.layers_path,
            "state_policy": c.state_policy,
            "period": self._period,
            "active_layers": list(self._active),
            "period_log": [dict(entry) for entry in self.period_log],
            # Module-wise: the open period's gradient sums so far, so a resumed run logs the same norms (and so
            # samples the same modules later) as an uninterrupted one.
            "open_gradients": None if self.gradient_norms is None else self.gradient_norms.state(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue a run: check the schedule matches and re-enter the saved period (without replaying it)."""
        if state.get("format") != _STATE_DICT_FORMAT:
            raise ValueError(f"unknown LisaController state format {state.get('format')!r}")
        mine = self.state_dict()
        # Written before sampling modes and module granularity existed.
        state = {"sampling": "uniform", "granularity": "layer", "module_budget": None, **state}
        for key in ("seed", "n_layers", "n_active_layers", "interval_steps", "layer_weights", "sampling",
                    "granularity", "module_budget"):
            if state[key] != mine[key]:
                raise ValueError(
                    f"the checkpoint was written with {key}={state[key]!r} but this run has {key}={mine[key]!r}: "
                    f"the layer schedule would differ from the interrupted run"
                )
        self.update_norms.opened = None
        self.period_log = [dict(entry) for entry in state["period_log"]]
        if state["period"] is not None:
            self._enter_period(int(state["period"]), enforce_all=True)
        opened = state.get("open_gradients")
        if opened is not None and self.gradient_norms is not None:
            self.gradient_norms.load_state(opened)
        # A prefetch issued before the checkpoint did not survive it; issue it again if the window is open.
        self._prefetched_for = None

    def period_start_state(self) -> dict | None:
        """The open period's first step and the weights it started from (host tensors by parameter name); None
        between periods. A checkpoint keeps it beside `state_dict()` (which stays JSON-safe), so that a resumed run
        logs the same update norms for the period the checkpoint cut as an uninterrupted run."""
        return self.update_norms.start_state()

    def load_period_start_state(self, state: dict | None) -> None:
        """After `load_state_dict`: measure the open period's update norms from the weights it started from."""
        if state is None or state["period"] != self._period:
            return
        self.update_norms.load_start_state(state, self.model)

    # ------------------------------------------------------------------------------------------------ internals
    def _check_optimizer(self) -> None:
        held = {id(p) for group in self._opt.param_groups for p in group["params"]}
        missing = [p for ps in self._layer_params for p in ps if id(p) not in held]
        missing += [p for p in self._always_params if id(p) not in held]
        if missing:
            example = self._names.get(id(missing[0]), "?")
            raise OptimizerMissesParameters(
                f"the optimizer does not hold {len(missing)} parameters that LISA trains (e.g. {example!r}); "
                f"a layer missing from it would never train when sampled. Build it over all parameters, frozen "
                f"or not: build_optimizer(model, cfg, lr=...) or LisaCallback.optimizer_for(model, ...)",
                len(missing), example)

    def _params_of(self, units) -> list[nn.Parameter]:
        return [p for u in sorted(units) for p in self._unit_params[u]]

    def _enter_period(self, period: int, enforce_all: bool = False) -> None:
        new = self.units_for_period(period)
        old = set(range(self.n_units)) if enforce_all else set(self._active)
        leaving = sorted(old - set(new))
        # At construction/resume nothing needs unparking now: the parker unparks on demand before a step.
        arriving = [] if enforce_all else sorted(set(new) - set(self._active))

        self._active = new
        self._take_model()

        leaving_params = self._params_of(leaving)
        if enforce_all:  # at construction/resume, only layers that actually hold state need the policy
            leaving_params = [p for p in leaving_params if self._opt.state.get(p)]
        self._apply_state_policy(leaving_params, self._params_of(arriving))
        self._period = period
        if self.gradient_norms is not None:
            self.gradient_norms.restart(local_tensor(self._unit_params[0][0]).device)

    def _take_model(self) -> None:
        """Set `requires_grad` of every parameter for the current period (a frozen one's `.grad` dropped: a zero
        gradient would still move it through AdamW's momentum and weight decay), then run the freeze hooks."""
        trained = {id(p) for p in self._always_params} | {id(p) for p in self._params_of(self._active)}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trained)
            if id(p) not in trained:
                p.grad = None
        self._holds_model = True
        for hook in self._freeze_hooks:
            hook(self)

    def _measured_groups(self) -> list[tuple[str, list[nn.Parameter]]]:
        """Module-wise: the groups whose gradient norms the period log keeps: each active module, then the
        always-trainable modules together."""
        return ([(self.module_names[u], self._unit_params[u]) for u in self._active]
                + [("always_trainable", self._always_params)])

    def _apply_state_policy(self, leaving: list[nn.Parameter], arriving: list[nn.Parameter]) -> None:
        policy = self.config.state_policy
        if policy == "park":
            self.parker.park(leaving)
            self.parker.unpark(arriving, non_blocking=True)
        elif policy == "reset":
            self.parker.drop(leaving)

    def _maybe_prefetch(self, step: int) -> None:
        c = self.config
        if c.state_policy != "park" or c.prefetch_steps == 0:
            return
        nxt = self._period + 1
        if self._prefetched_for == nxt or step < nxt * c.interval_steps - c.prefetch_steps:
            return
        incoming = set(self.units_for_period(nxt)) - set(self._active)
        self.parker.prefetch(self._params_of(incoming))
        self._prefetched_for = nxt

    def _tracked(self) -> list[tuple[str, list[nn.Parameter]]]:
        """(name, params) of the active layers (their active modules' params) and each always-trainable module; a
        tied parameter counts once."""
        by_layer: dict[int, list[nn.Parameter]] = {}
        for u in self._active:
            by_layer.setdefault(self._unit_layer[u], []).extend(self._unit_params[u])
        groups = [(f"layer{i}", params) for i, params in sorted(by_layer.items())]
        return groups + list(zip(self.always_trainable, self._always_params_by_module))

    def _close_period(self, last_step: int) -> None:
        opened = self.update_norms.opened
        if opened is None or opened.period != self._period or last_step < opened.first_step:
            self.update_norms.opened = None
            return
        tracked = self.config.track_update_norms
        norms = self.update_norms.close(self._tracked())
        start = opened.period * self.config.interval_steps
        layers = self.active_layers
        entry = {
            "period": opened.period,
            "first_step": opened.first_step,
            "last_step": last_step,
            "partial": opened.first_step != start or last_step != start + self.config.interval_steps - 1,
            "layers": list(layers),
            "layer_update_norms": [norms[f"layer{i}"] for i in layers] if tracked else None,
            "module_update_norms": {path: norms[path] for path in self.always_trainable} if tracked else None,
        }
        if self.gradient_norms is not None:
            rms = self.gradient_norms.read()
            entry.update({"modules": list(self.active_modules), "module_grad_norms": rms[:-1],
                          "always_grad_norm": rms[-1]})
        self.period_log.append(entry)
