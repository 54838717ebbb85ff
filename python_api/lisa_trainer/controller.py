"""The LISA controller: which layers train when, and what happens to their optimizer state at a switch.

At each period start it toggles `requires_grad` (and sets frozen layers' `.grad` to None: a zero gradient would
still move a weight through AdamW's momentum and weight decay), applies the state policy to the layers leaving the
active set through the optimizer's `StateParker` ("park": into the host bank, "reset": forgotten, "keep": left on
the device), prefetches the next period's parked state `prefetch_steps` before the switch, and at each period's
end records per-layer weight-update norms.

The optimizer must hold every parameter (checked), so a layer frozen when the optimizer is built still trains when
it is sampled; the schedule is a pure function of (seed, period), so ranks and resumed runs agree without talking.

With `granularity="module"` the unit switched is a module inside a decoder layer instead of a whole layer; the
schedule is then a pure function of (seed, period, the period log), whose per-module gradient norms an optimizer
step pre-hook measures, and which every checkpoint holds, with the open period's sums so far.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from lisa_kernels import FusedAdamW, HostStateBank, StateParker
from lisa_kernels.optimizer import _local

from .frozen_weights import FrozenWeightOffload
from .layers import (
    ALWAYS_TRAINABLE_DEFAULT,
    always_trainable_modules,
    decoder_modules,
    find_decoder_layers,
    refuse_peft_model,
    unique_parameters,
)
from .options import OptionError, option
from .sampler import (LAYER_WEIGHT_RULES, SAMPLING_MODES, LayerSampler, ModuleSampler, auto_layer_weights,
                      module_importance, outlier_layer_weights, parse_layer_weights)

__all__ = ["BITSANDBYTES_OPTIMIZERS", "LisaConfig", "LisaController", "OPTIMIZERS", "OptimizerMissesParameters",
           "build_optimizer", "STATE_POLICIES"]

STATE_POLICIES = ("park", "reset", "keep")
GRANULARITIES = ("layer", "module")
EMBEDDING_STATE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}
logger = logging.getLogger(__name__)
_STATE_DICT_FORMAT = 1
# Update norms are computed on the parameter's device in chunks of this many elements, so a 128k x 4096 embedding
# needs a 64 MiB fp32 temporary, not 2 GiB.
_NORM_CHUNK = 1 << 24


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


@dataclass
class LisaConfig:
    """LISA settings. Every field is validated on construction; errors (:class:`OptionError`, a ValueError) name
    the field, and on the command line its flag (given beside each field).

    always_trainable: roles ("input_embeddings", "output_embeddings", "final_norm") and/or dotted module paths
        trained in every period; None means all three roles; () means none.
    track_update_norms: record per-layer weight-update norms in `period_log` (costs one device-to-host copy of
        the period's trained weights at its start; False still logs the layers of each period).
    embedding_state_dtype: dtype of the AdamW moments of the input embedding and the output head, which train in
        every period: None (as every other parameter: fp32, or the parameter's dtype for fp32/fp64 parameters),
        "float32" or "bfloat16" (half their moment bytes; the decoder layers keep theirs; quality effect measured
        in the README's Quality section).
    sparse_embedding_state: keep the input embedding's AdamW moments only for the rows (tokens) that have had a
        gradient, bit-identical to dense AdamW (`lisa_kernels.sparse_rows`); not used for an embedding tied to the
        head, whose gradient is dense (`build_optimizer` logs which path it took).
    sparse_embedding_grad: in `LisaTrainer`, give the input embedding a sparse gradient (`nn.Embedding(sparse=True)`:
        tokens x hidden values instead of vocabulary x hidden, 8 MB instead of 1.05 GB at Llama-3-8B for 1,024
        tokens), which FusedAdamW steps exactly in the row-sparse state above. Where that state is not used (tied
        head, FSDP, another optimizer), under data parallelism (the bucketed gradient all-reduce takes dense
        gradients), for an embedding module without a `sparse` flag and with Hugging Face's Trainer (which clips
        with torch's `clip_grad_norm_`) the gradient stays dense; `LisaTrainer` logs which gradient it uses.
    granularity: the unit LISA samples. "layer": whole decoder layers (the paper). "module": the modules inside the
        decoder layers (attention projections, MLP matrices, norms; MISA, arXiv 2511.00056), drawn each period by
        weighted sampling without replacement until `module_budget` trainable parameters are filled, weighted by
        their gradient norms measured while they trained (`sampler.module_importance`); every module the draw
        skips or leaves out is frozen, its optimizer state parked like a frozen layer's.
    module_budget: trainable decoder parameters per period with granularity="module" (MISA's δ times the model
        size); None: those of `n_active_layers` whole layers, so the device state matches layer-wise LISA.
    offload_frozen_layers: how many of each period's frozen decoder layers keep their weights in host memory,
        brought to the device one layer at a time while they compute (`lisa_trainer.frozen_weights`; the lowest-
        numbered frozen layers; 0: none). Bit-identical results; each offloaded layer's weights cross to the device
        twice per step (forward and the backward's recompute), so gradient checkpointing is needed and steps slow
        down where the copies outlast the compute.
    """

    n_active_layers: int = option(2, flag="--lisa_activated_layers", aliases=("--lisa_n_layers",),  # axolotl's name
                                  help="γ: decoder layers trained per period (the paper uses 1, 2, 4 or 8)")
    interval_steps: int = option(20, flag="--lisa_interval_steps", aliases=("--lisa_step_interval",),  # axolotl's
                                 help="K: optimizer steps per period (the paper's typical value is 20)")
    layers_attribute: str | None = option(None, flag="--lisa_layers_attribute",
                                          help="dotted path of the decoder-layer list, e.g. model.layers or LMFlow's "
                                               "model.model.layers (default: found by structure)")
    seed: int = 0  # the layer schedule is a pure function of (seed, period); the command line's --seed sets it
    layer_weights: Sequence[float] | str | None = option(
        None, flag="--lisa_layer_weights", parse=parse_layer_weights,
        help="per-layer importance weights (non-negative, one per layer; default: uniform): 'auto' (estimated "
             "during the run from past periods' update norms), 'outlier' (each layer's share of outlier weights, "
             "OWS), a comma or JSON list, a JSON file with a list, or a previous run's train_log.jsonl (its mean "
             "update norms)")
    sampling: str = option("uniform", flag="--lisa_sampling", choices=SAMPLING_MODES,
                           help="uniform: independent draws each period (the paper's rule); balanced: every layer "
                                "trains in the same number of periods over each cycle (no weights)")
    state_policy: str = option("park", flag="--lisa_state_policy", choices=STATE_POLICIES,
                               help="a deactivated layer's optimizer state: park (host memory, brought back when "
                                    "sampled again), reset (dropped) or keep (stays on the device)")
    prefetch_steps: int = option(1, flag="--lisa_prefetch_steps",
                                 help="bring the next period's parked state back this many steps before the switch "
                                      "(0: at the switch)")
    always_trainable: Sequence[str] | None = None
    track_update_norms: bool = True
    embedding_state_dtype: str | None = option(None, flag="--lisa_embedding_state_dtype", choices=("float32", "bfloat16"),
                                               help="moment dtype of the input embedding and the output head (default: "
                                                    "as every other parameter's); bfloat16 halves their moments")
    sparse_embedding_state: bool = option(True, flag="--lisa_sparse_embedding_state",
                                          help="keep the input embedding's moments only for rows (tokens) that had a "
                                               "gradient: exact, and a few percent of a large vocabulary")
    sparse_embedding_grad: bool = option(True, flag="--lisa_sparse_embedding_grad",
                                         help="give the input embedding a sparse gradient (the step's tokens only, "
                                              "not the whole vocabulary), stepped exactly in its row-sparse state; "
                                              "dense under data parallelism")
    granularity: str = option("layer", flag="--lisa_granularity", choices=GRANULARITIES,
                              help="what LISA samples: layer (whole decoder layers) or module (attention and MLP "
                                   "matrices and norms inside them, weighted by their gradient norms: MISA)")
    module_budget: int | None = option(None, flag="--lisa_module_budget",
                                       help="with --lisa_granularity module: trainable decoder parameters per period "
                                            "(default: as many as --lisa_activated_layers whole layers)")
    offload_frozen_layers: int = option(0, flag="--lisa_offload_frozen_layers",
                                        help="keep up to this many frozen decoder layers' weights in host memory, "
                                             "each brought to the device only while it computes (needs "
                                             "--gradient_checkpointing; exact; every step copies them twice)")

    def __post_init__(self):
        def refuse(name, problem, mentions=()):
            raise OptionError(LisaConfig, name, problem, mentions)

        if not _is_int(self.n_active_layers) or self.n_active_layers < 1:
            refuse("n_active_layers", f"must be a positive integer, got {self.n_active_layers!r}")
        if not _is_int(self.interval_steps) or self.interval_steps < 1:
            refuse("interval_steps", f"must be a positive integer, got {self.interval_steps!r}")
        if self.layers_attribute is not None and not (isinstance(self.layers_attribute, str) and self.layers_attribute):
            refuse("layers_attribute", f"must be None or a dotted module path, got {self.layers_attribute!r}")
        if not _is_int(self.seed):
            refuse("seed", f"must be an int, got {self.seed!r}")
        if isinstance(self.layer_weights, str):
            if self.layer_weights not in LAYER_WEIGHT_RULES:
                refuse("layer_weights", f"must be None, 'auto', 'outlier' or a sequence of numbers, got "
                       f"{self.layer_weights!r}")
        elif self.layer_weights is not None:
            try:
                if not isinstance(self.layer_weights, Sequence):
                    raise TypeError
                weights = [float(w) for w in self.layer_weights]
            except (TypeError, ValueError):
                refuse("layer_weights", f"must be a sequence of numbers, got {self.layer_weights!r}")
            bad = [i for i, w in enumerate(weights) if not math.isfinite(w) or w < 0]
            if bad:
                refuse("layer_weights", f"must be finite and non-negative; bad entries at {bad}")
            nonzero = sum(w > 0 for w in weights)
            if nonzero < self.n_active_layers:
                refuse("layer_weights", f"has {nonzero} non-zero entries, fewer than {{n_active_layers}}="
                       f"{self.n_active_layers}; layers are chosen without replacement", ("n_active_layers",))
            self.layer_weights = tuple(weights)
        if self.state_policy not in STATE_POLICIES:
            refuse("state_policy", f"must be one of {STATE_POLICIES}, got {self.state_policy!r}")
        if not _is_int(self.prefetch_steps) or self.prefetch_steps < 0:
            refuse("prefetch_steps", f"must be a non-negative int, got {self.prefetch_steps!r}")
        if self.always_trainable is not None:
            if isinstance(self.always_trainable, str) or not all(isinstance(a, str) for a in self.always_trainable):
                refuse("always_trainable", f"must be None or a sequence of roles {ALWAYS_TRAINABLE_DEFAULT} or "
                       f"module paths, got {self.always_trainable!r}")
            self.always_trainable = tuple(self.always_trainable)
        if not isinstance(self.track_update_norms, bool):
            refuse("track_update_norms", f"must be a bool, got {self.track_update_norms!r}")
        if self.embedding_state_dtype not in EMBEDDING_STATE_DTYPES:
            refuse("embedding_state_dtype", f"must be one of {list(EMBEDDING_STATE_DTYPES)}, got "
                   f"{self.embedding_state_dtype!r}")
        if not isinstance(self.sparse_embedding_state, bool):
            refuse("sparse_embedding_state", f"must be a bool, got {self.sparse_embedding_state!r}")
        if not isinstance(self.sparse_embedding_grad, bool):
            refuse("sparse_embedding_grad", f"must be a bool, got {self.sparse_embedding_grad!r}")
        if not _is_int(self.offload_frozen_layers) or self.offload_frozen_layers < 0:
            refuse("offload_frozen_layers", f"must be a non-negative int, got {self.offload_frozen_layers!r}")
        if self.sampling not in SAMPLING_MODES:
            refuse("sampling", f"must be one of {SAMPLING_MODES}, got {self.sampling!r}")
        if self.sampling == "balanced" and self.layer_weights is not None:
            refuse("sampling", f"'balanced' gives every layer the same share, so it takes no {{layer_weights}} (got "
                   f"{self.layer_weights!r})", ("layer_weights",))
        if self.granularity not in GRANULARITIES:
            refuse("granularity", f"must be one of {GRANULARITIES}, got {self.granularity!r}")
        if self.module_budget is not None and (not _is_int(self.module_budget) or self.module_budget < 1):
            refuse("module_budget", f"must be None or a positive int, got {self.module_budget!r}")
        if self.granularity == "layer" and self.module_budget is not None:
            refuse("module_budget", "applies to {granularity}='module' only", ("granularity",))
        if self.granularity == "module" and (self.layer_weights is not None or self.sampling != "uniform"):
            refuse("granularity", "'module' weights modules by their gradient norms; it takes neither "
                   "{layer_weights} nor {sampling}='balanced'", ("layer_weights", "sampling"))
        if self.layer_weights == "auto" and not self.track_update_norms:
            refuse("layer_weights", "'auto' learns from update norms: it needs {track_update_norms}=True",
                   ("track_update_norms",))


class OptimizerMissesParameters(ValueError):
    """The optimizer does not hold parameters that LISA trains (built over trainable ones only, or flattened)."""

    def __init__(self, message: str, count: int, example: str):
        super().__init__(message)
        self.count, self.example = count, example


def _unwrap_optimizer(optimizer):
    """The optimizer that owns the state (accelerate's AcceleratedOptimizer wraps the real one)."""
    inner = optimizer
    while isinstance(getattr(inner, "optimizer", None), torch.optim.Optimizer):
        inner = inner.optimizer
    return inner


def _unwrap_model(model: nn.Module) -> nn.Module:
    """The model itself, not a DistributedDataParallel/FSDP `.module` or torch.compile `._orig_mod` wrapper: the
    parameters are the same objects, but only the model has `get_input_embeddings` and the familiar paths."""
    while True:
        inner = getattr(model, "_orig_mod", None) or getattr(model, "module", None)
        if not isinstance(inner, nn.Module):
            return model
        model = inner


@dataclass
class _OpenPeriod:
    period: int
    first_step: int
    snapshots: dict[int, torch.Tensor] = field(default_factory=dict)  # id(param) -> host copy at first_step


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
        if not _is_int(start_step) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        self.model = model = _unwrap_model(model)
        refuse_peft_model(model)
        self.config = config
        self.optimizer = optimizer
        self._opt = _unwrap_optimizer(optimizer)

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
        self.frozen_weights: FrozenWeightOffload | None = None  # while it holds the model, with offloaded layers
        self.parker = StateParker.of(self._opt) if config.state_policy in ("park", "reset") else None
        if config.state_policy == "park":
            # Create the host state bank now: its first creation on a machine builds the native arena (~10 s), which
            # would otherwise stall the first switch's step.
            self.parker.bank
        self._period: int | None = None
        self._active: tuple[int, ...] = ()
        self._prefetched_for: int | None = None
        self._open: _OpenPeriod | None = None
        self.period_log: list[dict] = []
        # Module-wise: squared gradient norms of the active modules and (last) of the always-trainable ones, summed
        # over this period's optimizer steps on the device, read once at its end.
        self._grad_sq: torch.Tensor | None = None
        self._grad_steps = 0
        if self.module_sampler is not None:
            self._opt.register_step_pre_hook(self._measure_gradients)
        self._enter_period(start_step // config.interval_steps, enforce_all=True)

    # ----------------------------------------------------------------------------------------------- public API
    @property
    def active_layers(self) -> tuple[int, ...]:
        """Indices of the decoder layers training in the current period (with granularity="module": those holding
        at least one active module)."""
        return tuple(sorted({self._unit_layer[u] for u in self._active}))

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
        if self._open is None:
            self._open_period(step)
        self._maybe_prefetch(step)

    def on_step_end(self, step: int) -> None:
        """After `optimizer.step()`: close the period (record update norms) when `step` is its last step."""
        if (step + 1) % self.config.interval_steps == 0:
            self._close_period(last_step=step)

    def finish(self, last_step: int) -> None:
        """Record the current period's update norms when training stops in the middle of a period."""
        self._close_period(last_step=last_step)

    def release_model(self) -> None:
        """Give the model back as it was given: every parameter's `requires_grad` as at construction, offloaded
        weights back on their device (and their host copies and hooks gone). The next `on_step_begin` takes it
        again, so training can go on."""
        if self.frozen_weights is not None:
            self.frozen_weights.close()
            self.frozen_weights = None
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
            "open_gradients": None if self._grad_sq is None else {"steps": self._grad_steps,
                                                                  "sq_sums": self._grad_sq.tolist()},
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
        self._open = None
        self.period_log = [dict(entry) for entry in state["period_log"]]
        if state["period"] is not None:
            self._enter_period(int(state["period"]), enforce_all=True)
        opened = state.get("open_gradients")
        if opened is not None and self._grad_sq is not None:
            self._grad_steps = opened["steps"]
            self._grad_sq = torch.tensor(opened["sq_sums"], dtype=torch.float32, device=self._grad_sq.device)
        # A prefetch issued before the checkpoint did not survive it; issue it again if the window is open.
        self._prefetched_for = None

    def period_start_state(self) -> dict | None:
        """The open period's first step and the weights it started from (host tensors by parameter name); None
        between periods. A checkpoint keeps it beside `state_dict()` (which stays JSON-safe), so that a resumed run
        logs the same update norms for the period the checkpoint cut as an uninterrupted run."""
        opened = self._open
        if opened is None:
            return None
        return {"period": opened.period, "first_step": opened.first_step,
                "snapshots": {self._names[i]: t for i, t in opened.snapshots.items()}}

    def load_period_start_state(self, state: dict | None) -> None:
        """After `load_state_dict`: measure the open period's update norms from the weights it started from."""
        if state is None or state["period"] != self._period:
            return
        by_name = {n: id(p) for n, p in self.model.named_parameters()}
        self._open = _OpenPeriod(state["period"], state["first_step"],
                                 {by_name[n]: t for n, t in state["snapshots"].items()})

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
        if self.module_sampler is not None:
            device = _local(self._unit_params[0][0]).device
            self._grad_sq = torch.zeros(len(new) + 1, dtype=torch.float32, device=device)
            self._grad_steps = 0

    def _take_model(self) -> None:
        """Set `requires_grad` of every parameter for the current period (a frozen one's `.grad` dropped: a zero
        gradient would still move it through AdamW's momentum and weight decay) and offload frozen layers' weights."""
        trained = {id(p) for p in self._always_params} | {id(p) for p in self._params_of(self._active)}
        for p in self.model.parameters():
            p.requires_grad_(id(p) in trained)
            if id(p) not in trained:
                p.grad = None
        if self.config.offload_frozen_layers:
            if self.frozen_weights is None:
                self.frozen_weights = FrozenWeightOffload(self.layers)
            touched = {self._unit_layer[u] for u in self._active}
            frozen = [i for i in range(self.n_layers) if i not in touched]
            self.frozen_weights.set_offloaded(frozen[:self.config.offload_frozen_layers])
        self._holds_model = True

    def _measure_gradients(self, optimizer, args, kwargs) -> None:
        """Optimizer step pre-hook (module-wise): add each active module's squared gradient norm, and the
        always-trainable modules' together, to the period's sums (on the device: no synchronisation per step). FSDP2
        shards are summed over the ranks at once (one all-reduce of a few numbers), so every rank holds the whole
        model's sums and a checkpoint written by rank 0 resumes them exactly."""
        groups = [self._unit_params[u] for u in self._active] + [self._always_params]
        sq = torch.zeros(len(groups), dtype=torch.float32, device=self._grad_sq.device)
        for g, params in enumerate(groups):
            for p in params:
                if p.grad is not None:
                    grad = _local(p.grad)
                    values = grad.coalesce().values() if grad.is_sparse else grad
                    sq[g] += values.float().square().sum().to(sq.device)
        sharded = next((p for ps in groups for p in ps if hasattr(p, "device_mesh")), None)
        if sharded is not None:
            import torch.distributed as dist

            dist.all_reduce(sq, group=sharded.device_mesh.get_group())
        self._grad_sq += sq
        self._grad_steps += 1

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

    def _open_period(self, step: int) -> None:
        opened = _OpenPeriod(self._period, step)
        if self.config.track_update_norms:
            for _, params in self._tracked():
                for p in params:
                    opened.snapshots[id(p)] = _local(p.detach()).to("cpu", copy=True)
        self._open = opened

    def _close_period(self, last_step: int) -> None:
        opened, self._open = self._open, None
        if opened is None or opened.period != self._period or last_step < opened.first_step:
            return
        tracked = self.config.track_update_norms
        groups = self._tracked() if tracked else []
        totals = torch.zeros(len(groups), dtype=torch.float64)
        for g, (_, params) in enumerate(groups):
            for p in params:
                totals[g] += _sq_diff_norm(_local(p.detach()), opened.snapshots[id(p)]).cpu()
        totals = _sum_over_shards(totals, [p for _, params in groups for p in params])
        norms = {name: math.sqrt(total) for (name, _), total in zip(groups, totals.tolist())}
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
        if self.module_sampler is not None:
            entry.update(self._gradient_norms())
        self.period_log.append(entry)

    def _gradient_norms(self) -> dict:
        """The period's modules and their root-mean-square gradient norm per step (and the always-trainable
        modules'); the sums restart."""
        rms = [math.sqrt(s / self._grad_steps) if self._grad_steps else 0.0 for s in self._grad_sq.tolist()]
        self._grad_sq.zero_()
        self._grad_steps = 0
        return {"modules": list(self.active_modules), "module_grad_norms": rms[:-1], "always_grad_norm": rms[-1]}


def _sum_over_shards(totals: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """`totals` summed over the ranks when `params` are FSDP2 shards (each rank measured its own): one all-reduce
    of a few numbers per period; as they are otherwise."""
    sharded = next((p for p in params if hasattr(p, "device_mesh")), None)
    if sharded is None:
        return totals
    import torch.distributed as dist

    on_comm = totals.to(_local(sharded).device)  # NCCL moves device tensors only
    dist.all_reduce(on_comm, group=sharded.device_mesh.get_group())
    return on_comm.cpu()


def _sq_diff_norm(current: torch.Tensor, snapshot: torch.Tensor) -> torch.Tensor:
    """sum((current - snapshot)**2) in fp32 on `current`'s device, chunked to bound the temporary."""
    flat_now, flat_then = current.reshape(-1), snapshot.reshape(-1)
    total = torch.zeros((), dtype=torch.float32, device=current.device)
    for start in range(0, flat_now.numel(), _NORM_CHUNK):
        now = flat_now[start:start + _NORM_CHUNK].float()
        then = flat_then[start:start + _NORM_CHUNK].to(current.device, non_blocking=True).float()
        total += (now - then).square().sum()
    return total


# `optim` names, as Hugging Face's TrainingArguments spells them, plus ours.
OPTIMIZERS = ("adamw_lisa", "adamw_torch", "adamw_torch_fused", "adafactor", "paged_adamw_32bit", "adamw_bnb_8bit")
BITSANDBYTES_OPTIMIZERS = {"paged_adamw_32bit": "PagedAdamW32bit", "adamw_bnb_8bit": "AdamW8bit"}


def build_optimizer(model: nn.Module, cfg: LisaConfig | None = None, lr: float = 1e-5, weight_decay: float = 0.0,
                    *, optim: str = "adamw_lisa", **adamw_kwargs):
    """An optimizer over ALL of `model`'s parameters, frozen or not: `lisa_kernels.FusedAdamW` by default, or the
    one `optim` names (`OPTIMIZERS`; `adamw_kwargs` such as betas and eps go to the AdamW family).

    Frozen parameters cost nothing there (a parameter whose `.grad` is None is skipped: no state, no reads), and
    a layer frozen now is already in the optimizer when LISA samples it later. Weight decay applies to matrices
    only: biases and norm weights (1-D) go to a second group with `weight_decay=0.0`.
    The input embedding and the output head get a group each, with `cfg.embedding_state_dtype` moments; with
    FusedAdamW the input embedding's moments are row-sparse (`cfg.sparse_embedding_state`, exact) unless the head is
    tied to it. `cfg` with state_policy="park" gives FusedAdamW its host state bank (otherwise none is created);
    the controller attaches a `StateParker` to any of the others.
    """
    if cfg is not None and not isinstance(cfg, LisaConfig):
        raise TypeError(f"cfg must be a LisaConfig or None, got {type(cfg).__name__}")
    refuse_peft_model(model)
    ours = optim == "adamw_lisa"
    if ours and cfg is not None and cfg.state_policy == "park":
        adamw_kwargs.setdefault("state_bank", HostStateBank())
    cfg = cfg if cfg is not None else LisaConfig()
    embedding, head = _embedding_weight(model, "get_input_embeddings"), _embedding_weight(model, "get_output_embeddings")
    tied = embedding is not None and head is embedding
    sparse = ours and cfg.sparse_embedding_state and embedding is not None and not tied
    if ours and embedding is not None:
        logger.info("input embedding %s: %s AdamW state%s", tuple(embedding.shape), "row-sparse" if sparse else "dense",
                    " (tied to the output head, whose gradient is dense)" if tied else "")
    # None leaves the optimizer's own state_dtype (a build_optimizer keyword) to these groups too.
    lean = {} if cfg.embedding_state_dtype is None or not ours else {
        "state_dtype": EMBEDDING_STATE_DTYPES[cfg.embedding_state_dtype]}
    own_group = [p for p in (embedding, head) if p is not None]
    decay, no_decay = [], []
    for p in model.parameters():
        if not any(p is q for q in own_group):
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [g for g in ({"params": decay, "weight_decay": weight_decay},
                          {"params": no_decay, "weight_decay": 0.0}) if g["params"]]
    if embedding is not None:
        groups.append({"params": [embedding], "weight_decay": weight_decay, **({"sparse_rows": sparse} if ours else {}),
                       **lean})
    if head is not None and not tied:
        groups.append({"params": [head], "weight_decay": weight_decay, **lean})
    if ours:
        return FusedAdamW(groups, lr=lr, weight_decay=weight_decay, **adamw_kwargs)
    if optim in ("adamw_torch", "adamw_torch_fused"):
        fused = {"fused": True} if optim == "adamw_torch_fused" else {"foreach": True}
        return torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay, **fused, **adamw_kwargs)
    if optim == "adafactor":
        from transformers.optimization import Adafactor

        # Hugging Face Trainer's settings for optim="adafactor": the given lr, no relative step or scaling.
        return Adafactor(groups, lr=lr, weight_decay=weight_decay, scale_parameter=False, relative_step=False,
                         warmup_init=False)
    if optim in BITSANDBYTES_OPTIMIZERS:
        import bitsandbytes

        return getattr(bitsandbytes.optim, BITSANDBYTES_OPTIMIZERS[optim])(groups, lr=lr, weight_decay=weight_decay,
                                                                            **adamw_kwargs)
    raise OptionError("LisaTrainingArguments", "optim", f"must be one of {', '.join(OPTIMIZERS)}, got {optim!r}")


def _embedding_weight(model: nn.Module, getter: str) -> nn.Parameter | None:
    """The weight of `model.get_input_embeddings()` / `get_output_embeddings()`, if the model has one."""
    module = getattr(model, getter, lambda: None)()
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, nn.Parameter) else None
