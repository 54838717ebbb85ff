"""The options of a LISA run, defined once: `LisaConfig` (what LISA samples and how it keeps optimizer state) and
`LisaTrainingArguments` (how `LisaTrainer` trains), with the names they accept.

Each field carries its `lisa-finetune` flag, type, default and help (`options.option`), and its dataclass validates
it on construction, so an error (:class:`OptionError`, a ValueError) names the field, and on the command line the
flag. Rules that join options of both classes, or options and the run's layout (processes, sharding), live in
:mod:`lisa_trainer.memory`.
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .distributed import DEFAULT_TIMEOUT_S
from .layers import ALWAYS_TRAINABLE_DEFAULT
from .options import OptionError, option
from .sampler import LAYER_WEIGHT_RULES, SAMPLING_MODES, parse_layer_weights
from .trackers import parse_report_to

__all__ = ["BITSANDBYTES_OPTIMIZERS", "GRANULARITIES", "LisaConfig", "LisaTrainingArguments", "OPTIMIZERS",
           "SCHEDULES", "STATE_POLICIES"]

STATE_POLICIES = ("park", "reset", "keep")
GRANULARITIES = ("layer", "module")
EMBEDDING_STATE_DTYPES = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16}
SCHEDULES = ("linear", "cosine", "constant")
# `optim` names, as Hugging Face's TrainingArguments spells them, plus ours.
OPTIMIZERS = ("adamw_lisa", "adamw_torch", "adamw_torch_fused", "adafactor", "paged_adamw_32bit", "adamw_bnb_8bit")
BITSANDBYTES_OPTIMIZERS = {"paged_adamw_32bit": "PagedAdamW32bit", "adamw_bnb_8bit": "AdamW8bit"}


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
        in docs/quality.md).
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


@dataclass
class LisaTrainingArguments:
    """How `LisaTrainer` trains; each field is also a `lisa-finetune` flag of the same name (Hugging Face's and
    LMFlow's names). Validated on construction: an error (:class:`OptionError`, a ValueError) names the field."""

    output_dir: str
    learning_rate: float = option(5e-4, help="peak learning rate")
    weight_decay: float = option(0.0, help="AdamW weight decay")
    adam_beta1: float = option(0.9, help="AdamW beta1")
    adam_beta2: float = option(0.999, help="AdamW beta2")
    adam_epsilon: float = option(1e-8, help="AdamW epsilon")
    optim: str = option("adamw_lisa", choices=OPTIMIZERS,
                        help="adamw_lisa: FusedAdamW (fp32 moments for bf16 weights, one launch per dtype group); "
                             "adamw_torch / adamw_torch_fused: torch AdamW (foreach / fused); adafactor: "
                             "transformers' Adafactor; paged_adamw_32bit / adamw_bnb_8bit: bitsandbytes (if "
                             "installed). Every one parks frozen layers' state with --lisa_state_policy park")
    lr_scheduler_type: str = option("cosine", choices=SCHEDULES, help="decay after the warmup")
    warmup_steps: int = option(0, help="linear warmup steps")
    warmup_ratio: float = option(0.0, help="warmup as a share of all steps, when --warmup_steps is 0")
    num_train_epochs: float = option(1.0, help="passes over the data (when --max_steps is -1)")
    max_steps: int = option(-1, help="optimizer steps; > 0 overrides --num_train_epochs")
    per_device_train_batch_size: int = option(8, help="sequences per micro-batch and rank")
    per_device_eval_batch_size: int | None = option(None, help="sequences per held-out batch (default: the "
                                                                "training batch)")
    gradient_accumulation_steps: int = option(1, help="micro-batches per optimizer step")
    max_grad_norm: float = option(1.0, help="gradient clipping; 0 disables it (the norm is still logged)")
    bf16: bool = option(False, help="bf16 autocast on CUDA (weights and optimizer state keep their dtypes)")
    gradient_checkpointing: bool = option(False, help="recompute activations in backward (less memory)")
    optimizer_in_backward: bool = option(False, help="update each trainable tensor as soon as its gradient is "
                                                     "complete and free the gradient: one gradient alive at a time "
                                                     "instead of all (same updates; needs --max_grad_norm 0, "
                                                     "--gradient_accumulation_steps 1, --optim adamw_lisa, one "
                                                     "process)")
    chunked_loss: bool = option(True, help="LM-head loss over tiles of the logits, never all of them (0: the "
                                           "plain loss)")
    seed: int = option(0, help="data order, layer schedule (and the demo's weights)")
    logging_steps: int = option(1, help="write a step record to train_log.jsonl every N steps (and the last)")
    eval_steps: int | None = option(None, help="evaluate on the held-out split every N steps (default: before "
                                               "and after training)")
    save_steps: int | None = option(None, help="write a resumable checkpoint every N steps")
    save_total_limit: int | None = option(None, help="keep only this run's newest N checkpoints")
    save_model: bool = True  # write the final model + tokenizer to output_dir
    progress: bool = True
    device: str | None = option(None, help="cuda, cuda:1 or cpu (default: cuda when available)")
    overwrite_output_dir: bool = option(False, help="start a new run in an output folder that holds another run's "
                                                    "log or checkpoints")
    max_nonfinite_steps: int = option(10, help="stop after this many steps in a row with a NaN/inf loss or "
                                               "gradient norm (each is skipped)")
    ddp_timeout: int = option(DEFAULT_TIMEOUT_S, help="under torchrun: seconds a rank waits for the others "
                                                       "before the run fails")
    fsdp: bool = option(False, help="under torchrun: shard weights, gradients and optimizer state over the ranks "
                                    "(FSDP2)")
    report_to: str = option("none", help="none, all, tensorboard, wandb (comma list): where the log records go "
                                         "besides train_log.jsonl")
    run_name: str | None = option(None, help="the run's name in --report_to trackers (default: the output "
                                             "folder's name)")

    def __post_init__(self):
        finite = math.isfinite
        checks = [
            ("learning_rate", finite(self.learning_rate) and self.learning_rate > 0, "must be a finite number > 0"),
            ("weight_decay", finite(self.weight_decay) and self.weight_decay >= 0, "must be a finite number >= 0"),
            # torch's AdamW's own limits, checked before a model is loaded
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "must be in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "must be in [0, 1)"),
            ("adam_epsilon", finite(self.adam_epsilon) and self.adam_epsilon >= 0, "must be a finite number >= 0"),
            ("optim", self.optim in OPTIMIZERS, f"must be one of {', '.join(OPTIMIZERS)}"),
            ("lr_scheduler_type", self.lr_scheduler_type in SCHEDULES, f"must be one of {', '.join(SCHEDULES)}"),
            ("warmup_steps", self.warmup_steps >= 0, "must be >= 0"),
            ("warmup_ratio", 0 <= self.warmup_ratio < 1, "must be in [0, 1)"),
            ("max_steps", self.max_steps > 0 or self.max_steps == -1, "must be > 0, or -1 to train for num_train_epochs"),
            ("num_train_epochs", self.max_steps > 0 or (finite(self.num_train_epochs) and self.num_train_epochs > 0),
             "must be a finite number > 0 when max_steps is -1"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "must be >= 1"),
            ("per_device_eval_batch_size", self.per_device_eval_batch_size is None or self.per_device_eval_batch_size >= 1,
             "must be >= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "must be >= 1"),
            ("max_grad_norm", finite(self.max_grad_norm) and self.max_grad_norm >= 0,
             "must be a finite number >= 0 (0: no clipping)"),
            ("logging_steps", self.logging_steps >= 1, "must be >= 1"),
            ("eval_steps", self.eval_steps is None or self.eval_steps >= 1, "must be >= 1"),
            ("save_steps", self.save_steps is None or self.save_steps >= 1, "must be >= 1"),
            ("save_total_limit", self.save_total_limit is None or self.save_total_limit >= 1, "must be >= 1"),
            ("max_nonfinite_steps", self.max_nonfinite_steps >= 1, "must be >= 1"),
            ("ddp_timeout", self.ddp_timeout > 0, "must be > 0"),
        ]
        for name, ok, problem in checks:
            if not ok:
                raise OptionError(LisaTrainingArguments, name, f"{problem}, got {getattr(self, name)!r}")
        from .memory import check_training_arguments  # the rules joining fields live with the features

        check_training_arguments(self)
        if self.optim in BITSANDBYTES_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
            raise OptionError(LisaTrainingArguments, "optim", f"{self.optim} needs the bitsandbytes package (pip "
                              "install bitsandbytes); adamw_lisa keeps fp32 moments and parks frozen layers' state "
                              "in host memory without it")
        try:  # an unknown tracker is refused before training starts
            parse_report_to(self.report_to)
        except ValueError as e:
            raise OptionError(LisaTrainingArguments, "report_to", f"names {e}") from None
