"""`LisaTrainer`: a plain, deterministic training loop around a `LisaController` and `FusedAdamW`.

One optimizer step = ``gradient_accumulation_steps`` micro-batches. The loss of a step is the mean over every
trained token of all its micro-batches (not the mean of per-micro-batch means, which would weight a short padded
batch like a full one). The data order is a pure function of (seed, epoch), so a resumed run finds its place from
the step count alone and sees exactly the batches an uninterrupted run would.

Everything the run does goes to ``<output_dir>/train_log.jsonl`` (see :mod:`lisa_trainer.runlog`). A run holds its
output folder alone (see :mod:`lisa_trainer.run_folder`). A step whose loss or gradient norm is not finite is
skipped (no weight update; logged with ``"skipped"``; with ``optimizer_in_backward``, which updates each tensor
during backward, only the tensors whose gradient is not finite are left as they were); ``max_nonfinite_steps`` of
them in a row stop the run with :class:`TrainingDiverged`, and weights that are not finite are never saved.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import inspect
import math
import pickle
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from lisa_kernels import StepInBackward

from .checkpoint import (
    MODEL_FILE,
    CheckpointError,
    CheckpointWriteError,
    checkpoint_dir,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    write_failure_reason,
)
from .controller import BITSANDBYTES_OPTIMIZERS, OPTIMIZERS, LisaConfig, LisaController, build_optimizer
from .data import IGNORE_INDEX, Collator, TokenizedDataset, pad_token_id
from .run_folder import claim_output_dir, log_run_id
from .runlog import LOG_FILE, JsonlLog, period_record, read_log
from .loss import ChunkedCausalLMLoss
from .distributed import DEFAULT_TIMEOUT_S, DataParallel, NullLog, launched_world_size
from .gradients import clip_grad_norm, input_embedding, use_sparse_embedding_grad
from .layers import enable_gradient_checkpointing, find_decoder_layers
from .options import OptionError, option
from .trackers import Trackers, parse_report_to

SCHEDULES = ("linear", "cosine", "constant")


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
        if self.optimizer_in_backward:
            # Each is something that needs every gradient before the first update.
            needs = [("max_grad_norm", self.max_grad_norm == 0, "0 (clipping scales every gradient by the norm of "
                      "all of them, known only after the last update)"),
                     ("gradient_accumulation_steps", self.gradient_accumulation_steps == 1, "1 (every backward "
                      "updates, so each micro-batch would make a step)"),
                     ("optim", self.optim == "adamw_lisa", "adamw_lisa (FusedAdamW's per-tensor step)")]
            for name, ok, value in needs:
                if not ok:
                    raise OptionError(LisaTrainingArguments, "optimizer_in_backward", f"needs {{{name}}} {value}, "
                                      f"got {getattr(self, name)!r}", (name,))
        if self.optim in BITSANDBYTES_OPTIMIZERS and importlib.util.find_spec("bitsandbytes") is None:
            raise OptionError(LisaTrainingArguments, "optim", f"{self.optim} needs the bitsandbytes package (pip "
                              "install bitsandbytes); adamw_lisa keeps fp32 moments and parks frozen layers' state "
                              "in host memory without it")
        try:  # an unknown tracker is refused before training starts
            parse_report_to(self.report_to)
        except ValueError as e:
            raise OptionError(LisaTrainingArguments, "report_to", f"names {e}") from None


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int, kind: str) -> float:
    """Learning rate for optimizer step ``step`` (0-based): linear warmup from 0, then linear/cosine decay to 0."""
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if kind == "constant":
        return base_lr
    decay = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay)
    if kind == "linear":
        return base_lr * (1.0 - progress)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class TrainingDiverged(RuntimeError):
    """The loss or gradient norm stayed non-finite for ``max_nonfinite_steps`` steps, or a weight is not finite."""


def _peak_host_rss_mb() -> float | None:
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (1024 * 1024) if sys.platform == "darwin" else rss / 1024  # bytes on macOS, KiB on Linux


class LisaTrainer:
    """Fine-tune a causal LM with LISA.

    ``model`` is any Hugging Face causal LM (or a module with the same call convention returning ``.logits``);
    ``train_dataset``/``eval_dataset`` come from :func:`lisa_trainer.data.tokenize_dataset`.
    """

    def __init__(
        self,
        model,
        tokenizer,
        train_dataset: TokenizedDataset,
        args: LisaTrainingArguments,
        lisa_config: LisaConfig,
        eval_dataset: TokenizedDataset | None = None,
    ):
        if len(train_dataset) == 0:
            raise ValueError("train_dataset is empty")
        self.args, self.lisa_config, self.tokenizer = args, lisa_config, tokenizer
        self.train_dataset, self.eval_dataset = train_dataset, eval_dataset
        self.output_dir = Path(args.output_dir)
        if args.optimizer_in_backward and launched_world_size() > 1:
            raise OptionError(LisaTrainingArguments, "optimizer_in_backward", f"runs in one process: under torchrun "
                              f"(WORLD_SIZE={launched_world_size()}) the ranks' gradients are averaged after backward, "
                              f"after the update")
        if args.optimizer_in_backward and lisa_config.granularity == "module":
            raise OptionError(LisaTrainingArguments, "optimizer_in_backward", "steps each tensor inside backward, "
                              "where the module-wise sampling cannot measure the gradient norms it samples by; "
                              "use it with --lisa_granularity layer")
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Under torchrun/accelerate (WORLD_SIZE > 1): data-parallel, see distributed.py; None in one process.
        self.dist, self.device = DataParallel.setup(self.device, args.ddp_timeout, fsdp=args.fsdp)
        self.use_bf16 = args.bf16 and self.device.type == "cuda"
        if args.bf16 and not self.use_bf16:
            dtype = next(model.parameters()).dtype
            warnings.warn(f"bf16 autocast is used on CUDA only: on {self.device.type} the model trains in the dtype "
                          f"it was loaded in ({str(dtype).removeprefix('torch.')})", stacklevel=2)
        # FSDP moves the model to the device unit by unit as it shards it (attach).
        self.model = model if self.dist and self.dist.fsdp else model.to(self.device)
        if self.dist:  # before the optimizer: FSDP replaces the parameters with their shards
            self.dist.attach(model, find_decoder_layers(model, lisa_config.layers_attribute)[1])
        if self.dist and self.dist.fsdp and lisa_config.sparse_embedding_state:
            # A checkpoint gathers each moment whole from the shards; the compact row-sparse form has no such layout.
            self.lisa_config = lisa_config = dataclasses.replace(lisa_config, sparse_embedding_state=False)
        self.optimizer = build_optimizer(
            model,
            lisa_config,
            lr=args.learning_rate,
            weight_decay=args.weight_decay,
            optim=args.optim,
            **({} if args.optim == "adafactor" else {"betas": (args.adam_beta1, args.adam_beta2),
                                                     "eps": args.adam_epsilon}),
        )
        if lisa_config.offload_frozen_layers and (self.dist or not args.gradient_checkpointing):
            raise OptionError(LisaConfig, "offload_frozen_layers", "needs gradient checkpointing "
                              "(--gradient_checkpointing: without it a layer's weights stay on the device from its "
                              "forward to its backward) and one process (each rank would copy its own)")
        self._given_embedding_sparse = getattr(input_embedding(model), "sparse", None)  # train() restores it
        self._take_model()
        self.controller = LisaController(model, self.optimizer, lisa_config)
        # FSDP gathers the root's weights (embedding, head) in the model's own forward, which the chunked loss
        # does not call: it would meet the head's shards.
        self.chunked_loss = ChunkedCausalLMLoss(model) if args.chunked_loss and not (self.dist and self.dist.fsdp) else None
        self.collator = Collator(pad_token_id(tokenizer))
        # One global micro-batch is split over the ranks, so the batch sequence does not depend on their number.
        self.global_batch_size = args.per_device_train_batch_size * (self.dist.world_size if self.dist else 1)
        self.batches_per_epoch = math.ceil(len(train_dataset) / self.global_batch_size)
        if self.dist:
            self.dist.check_batches(len(train_dataset), self.global_batch_size)
        if args.max_steps > 0:
            self.max_steps = args.max_steps
        else:
            self.max_steps = max(1, math.ceil(self.batches_per_epoch * args.num_train_epochs / args.gradient_accumulation_steps))
        self.warmup_steps = args.warmup_steps or math.ceil(args.warmup_ratio * self.max_steps)
        self.step = 0
        self.tokens_seen = 0
        self.run_id = ""  # set by train(): a new id, or the resumed checkpoint's
        self._epoch_order: dict[int, list[int]] = {}

    # -------------------------------------------------------------------------------------------------- data

    def _order(self, epoch: int) -> list[int]:
        if epoch not in self._epoch_order:
            gen = torch.Generator().manual_seed(self.args.seed * 100_003 + epoch)
            self._epoch_order = {epoch: torch.randperm(len(self.train_dataset), generator=gen).tolist()}
        return self._epoch_order[epoch]

    def micro_batch(self, index: int) -> dict[str, torch.Tensor] | None:
        """Global micro-batch ``index`` (counting from the start of training), the same on every run; with several
        ranks, this rank's share of it (None when a short last batch leaves this rank nothing)."""
        epoch, pos = divmod(index, self.batches_per_epoch)
        bs = self.global_batch_size
        order = self._order(epoch)[pos * bs : (pos + 1) * bs]  # the last batch of an epoch may be short
        if self.dist:
            order = self.dist.shard(order)
        return self.collator([self.train_dataset[i] for i in order]) if order else None

    # ------------------------------------------------------------------------------------------------- steps

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token cross-entropy over the batch's trained tokens (fp32 logits)."""
        with self._autocast():
            loss = self.chunked_loss(batch) if self.chunked_loss else None
            if loss is not None:
                return loss
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def _backward_stepping(self, loss: torch.Tensor, loss_value: float) -> StepInBackward | None:
        """``optimizer_in_backward``: backward in which each trainable tensor is updated as soon as its gradient is
        complete, and the gradient freed. The hooks go on the tensors that train now (after the controller's switch
        and the learning rate are set) and come off after backward. A non-finite loss skips the backward, and so
        the whole step (None), as a step after backward would; a non-finite gradient skips its own tensor's update
        (:class:`lisa_kernels.StepInBackward`), the tensors updated before it in that backward stay updated."""
        if not math.isfinite(loss_value):
            return None
        with StepInBackward(self.optimizer) as stepping:
            loss.backward()
        return stepping

    def _choose_embedding_grad(self) -> None:
        """On one process the input embedding's gradient holds the step's tokens only, where FusedAdamW's row-sparse
        group takes it (see gradients.py); chosen again after a checkpoint's param groups are loaded."""
        use_sparse_embedding_grad(self.model, self.optimizer, self.lisa_config.sparse_embedding_grad,
                                  data_parallel=self.dist is not None)

    def train_step(self) -> dict:
        """One optimizer step; returns its log record."""
        args, step = self.args, self.step
        started = time.perf_counter()
        if not self._holds_model:  # handed back by an earlier train(); the controller sets up its part itself
            self._take_model()
        self.controller.on_step_begin(step)
        lr = lr_at(step, base_lr=args.learning_rate, total_steps=self.max_steps, warmup_steps=self.warmup_steps, kind=args.lr_scheduler_type)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = args.gradient_accumulation_steps
        batches = [b for b in (self.micro_batch(step * accum + j) for j in range(accum)) if b is not None]
        n_trained = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        if self.dist:  # every rank divides by the global count: the summed gradient is the global token-mean's
            c = self.controller
            self.dist.on_step_begin(c.active_units, c.n_units, period=c.period,
                                    settings=(self.lisa_config.seed, self.lisa_config.interval_steps), unit=c.unit_name)
            n_trained, n_tokens = (int(n) for n in self.dist.sum(n_trained, n_tokens))
        self.model.train()
        loss_total = 0.0
        stepped_in_backward = None
        for i, b in enumerate(batches):
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            loss = self._loss_sum(b) / max(1, n_trained)
            loss_value = loss.item()
            if self.dist:  # gradients are communicated during the last backward only
                self.dist.backward(loss, last=i == len(batches) - 1)
            elif args.optimizer_in_backward:
                stepped_in_backward = self._backward_stepping(loss, loss_value)
            else:
                loss.backward()
            loss_total += loss_value
            self._release_offloaded_weights()
        if self.dist:
            comm_bytes = self.dist.finish_gradients()
            (loss_total,) = self.dist.sum(loss_total)
        params = [p for p in self.model.parameters() if p.grad is not None]
        if stepped_in_backward is not None:  # the step is done and every gradient freed
            grad_norm = float(stepped_in_backward.grad_norm())
        elif args.optimizer_in_backward:  # the loss was not finite: no backward ran
            grad_norm = math.nan
        else:
            grad_norm = clip_grad_norm(params, args.max_grad_norm)  # the input embedding's may be sparse
        finite = math.isfinite(loss_total) and math.isfinite(grad_norm)
        if stepped_in_backward is not None:
            finite = finite and stepped_in_backward.finite
        elif finite:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.controller.on_step_end(step)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elapsed = time.perf_counter() - started
        self.step += 1
        self.tokens_seen += n_tokens
        record = {
            "kind": "step",
            "step": self.step,
            "epoch": round(self.step * accum / self.batches_per_epoch, 4),
            "loss": loss_total,
            "lr": lr,
            "grad_norm": grad_norm,
            "active_layers": list(self.controller.active_layers),
            "tokens": n_tokens,
            "tokens_per_s": n_tokens / elapsed if elapsed > 0 else None,
            "step_time_s": elapsed,
        }
        if not finite:
            record["skipped"] = True
        if self.dist:
            record[self.dist.comm_record_key] = comm_bytes
            record["world_size"] = self.dist.world_size
        if self.device.type == "cuda":
            record["gpu_mem_allocated_mb"] = torch.cuda.memory_allocated(self.device) / 2**20
            record["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return record

    @torch.no_grad()
    def evaluate(self) -> float | None:
        """Mean next-token loss over the held-out set's trained tokens (``None`` without one)."""
        if not self.eval_dataset:
            return None
        self.model.eval()
        bs = self.args.per_device_eval_batch_size or self.args.per_device_train_batch_size
        total, count = 0.0, 0
        starts = range(0, len(self.eval_dataset), bs)
        for i in self.dist.eval_batches(starts) if self.dist else starts:
            b = self.collator([self.eval_dataset[j] for j in range(i, min(i + bs, len(self.eval_dataset)))])
            count += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(self._loss_sum({k: v.to(self.device) for k, v in b.items()}))
        self._release_offloaded_weights()
        if self.dist:
            total, count = self.dist.eval_sums(total, count)
        self.model.train()
        return total / max(1, count)

    def _release_offloaded_weights(self) -> None:
        """The last offloaded layer a pass used goes back to host memory (see `lisa_trainer.frozen_weights`)."""
        if self.controller.frozen_weights is not None:
            self.controller.frozen_weights.release_all()

    # ---------------------------------------------------------------------------------------------- the run

    def _trainer_state(self) -> dict:
        return {
            "step": self.step,
            "tokens_seen": self.tokens_seen,
            "max_steps": self.max_steps,
            "seed": self.args.seed,
            "lisa_config": dataclasses.asdict(self.lisa_config),
            **self._batching(),
        }

    def _batching(self) -> dict:
        """What the data position of a step depends on (`micro_batch`)."""
        return {"per_device_train_batch_size": self.args.per_device_train_batch_size,
                "world_size": self.dist.world_size if self.dist else 1,
                "gradient_accumulation_steps": self.args.gradient_accumulation_steps}

    def _warn_if_batching_changed(self, saved: dict, step: int) -> None:
        """The data position is counted in steps: other sequences per step resume at another place in the data."""
        now = self._batching()
        if any(key not in saved for key in now):
            return  # a checkpoint written before these were saved

        def per_step(b):
            return b["per_device_train_batch_size"] * b["world_size"] * b["gradient_accumulation_steps"]

        def position(b):  # epoch and first sequence (of that epoch's order) of the micro-batch after `step` steps
            global_batch = b["per_device_train_batch_size"] * b["world_size"]
            epoch, batch = divmod(step * b["gradient_accumulation_steps"],
                                  math.ceil(len(self.train_dataset) / global_batch))
            return f"epoch {epoch}, sequence {batch * global_batch}"

        def settings(b):
            return (f"--per_device_train_batch_size {b['per_device_train_batch_size']}"
                    + (f" x {b['world_size']} ranks" if b["world_size"] > 1 else "")
                    + f" x --gradient_accumulation_steps {b['gradient_accumulation_steps']}")

        if per_step(now) != per_step(saved):
            warnings.warn(f"resuming with {settings(now)} = {per_step(now)} sequences per step; the checkpoint was "
                          f"written with {settings(saved)} = {per_step(saved)}. The data position is counted in steps, "
                          f"so training continues at {position(now)} of the data order instead of {position(saved)}: "
                          f"sequences are skipped or seen twice. Resume with the checkpoint's values to continue "
                          f"exactly", stacklevel=3)

    def save_checkpoint(self) -> Path:
        path = checkpoint_dir(self.output_dir, self.step)
        self._check_weights_finite(path)  # every rank: the weights are the same everywhere
        # FSDP: the shards gathered into what one process would save (every rank takes part); None otherwise.
        gathered = self.dist.gather_checkpoint(self.model, self.optimizer, self.controller) if self.dist else None
        if self.dist and not self.dist.is_main:  # the ranks' states are identical: rank 0 writes, the others wait
            self.dist.barrier(f"writing {path}")
            return path
        save_checkpoint(
            path,
            model=self.model,
            optimizer=self.optimizer,
            controller=self.controller,
            state=self._trainer_state(),
            tokenizer=self.tokenizer,
            run_id=self.run_id,
            gathered=gathered,
        )
        prune_checkpoints(self.output_dir, self.args.save_total_limit, self.run_id)
        if self.dist:
            self.dist.barrier(f"writing {path}")
        return path

    def _check_weights_finite(self, destination: Path) -> None:
        for name, p in self.model.named_parameters():
            # min and max propagate NaN and show inf, without the parameter-sized temporary of isfinite(p).all()
            if p.is_floating_point() and p.numel() and not bool(torch.isfinite(torch.stack(torch.aminmax(p))).all()):
                raise TrainingDiverged(
                    f"{name} holds NaN or inf after step {self.step}: not writing {destination} (checkpoints written "
                    f"before are kept); try a lower learning rate than {self.args.learning_rate:g}"
                )

    def resume(self, checkpoint: str | Path) -> int:
        """Load a checkpoint folder; returns the step training continues from."""
        try:
            state = load_checkpoint(checkpoint, model=self.model, optimizer=self.optimizer, controller=self.controller,
                                    sharded=self.dist if self.dist and self.dist.fsdp else None)
        except SafetensorError as e:
            raise CheckpointError(f"{Path(checkpoint) / MODEL_FILE}: damaged or truncated ({e})") from e
        except CheckpointError:
            raise
        except pickle.UnpicklingError as e:
            raise CheckpointError(
                f"{checkpoint}: its trainer_state.pt is damaged or holds more than tensors and plain containers "
                f"(read with torch.load(weights_only=True), which runs no code)"
            ) from e
        except (ValueError, RuntimeError, KeyError) as e:  # another LISA schedule, weights of another shape
            lines = str(e).strip().splitlines()
            more = f"\n  ... ({len(lines) - 4} more lines)" if len(lines) > 4 else ""
            raise CheckpointError(f"{checkpoint}: cannot resume this run from it: " + "\n".join(lines[:4]) + more) from e
        self._choose_embedding_grad()  # a run saved under FSDP resumes with dense embedding state
        if state["seed"] != self.args.seed:
            warnings.warn(f"resuming with seed {self.args.seed}, checkpoint used {state['seed']}: data order changes", stacklevel=2)
        if state["max_steps"] != self.max_steps:
            warnings.warn(f"max_steps {self.max_steps} differs from the checkpoint's {state['max_steps']}: the lr schedule changes", stacklevel=2)
        self._warn_if_batching_changed(state, state["step"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        return self.step

    def train(self, resume_from_checkpoint: str | Path | None = None) -> dict:
        """Run to ``max_steps``; returns the summary (also the log's last record). ``resume_from_checkpoint``: a
        checkpoint folder, or "latest" (the newest checkpoint of the run logged in ``output_dir``).

        Afterwards, also when it fails, the model is handed back as it was given (see `_hand_back_model`)."""
        try:
            if self.dist and not self.dist.is_main:  # rank 0 holds the folder and decides the run; the others follow
                claim = self.dist.broadcast_object(None)
                self.run_id = claim.run_id
                return self._train(claim.resume_from)
            with claim_output_dir(self.output_dir, resume_from=resume_from_checkpoint or None,
                                  overwrite=self.args.overwrite_output_dir) as claim:
                if self.dist:
                    self.dist.broadcast_object(claim)
                self.run_id = claim.run_id
                return self._train(claim.resume_from)
        finally:
            self._hand_back_model()

    def _take_model(self) -> None:
        """Set the model up for training: gradient checkpointing (when asked for) and the input embedding's gradient.
        The controller sets `requires_grad` and offloads frozen layers' weights."""
        self._restore_checkpointing = None
        if self.args.gradient_checkpointing:
            self._restore_checkpointing = enable_gradient_checkpointing(self.model)
        self._choose_embedding_grad()
        self._holds_model = True

    def _hand_back_model(self) -> None:
        """The model as it was given: every weight on its device (none offloaded, no offload hooks), `requires_grad`
        of every parameter, the input embedding's `sparse` flag, gradient checkpointing and `use_cache` as before
        this trainer. The next step sets them up again."""
        self.controller.release_model()
        if self._restore_checkpointing is not None:
            self._restore_checkpointing()
            self._restore_checkpointing = None
        if self._given_embedding_sparse is not None:
            input_embedding(self.model).sparse = self._given_embedding_sparse
        self._holds_model = False

    def _train(self, resume_from: Path | None) -> dict:
        from tqdm.auto import tqdm

        args = self.args
        wall_start = time.perf_counter()
        if resume_from:
            self.resume(resume_from)
        resumed_at = self.step if resume_from else None
        own_log = resumed_at is not None and log_run_id(self.output_dir) == self.run_id
        main = not self.dist or self.dist.is_main
        if main:
            trackers = Trackers(parse_report_to(args.report_to), self.output_dir, args.run_name,
                                config={**dataclasses.asdict(args), **dataclasses.asdict(self.lisa_config)})
            log = JsonlLog(self.output_dir / LOG_FILE, resume_step=resumed_at if own_log else None,
                           resume_periods=len(self.controller.period_log), also=[trackers])
        else:
            log = NullLog()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        n_layers = self.controller.n_layers
        if log.is_new:
            log.write(
                {
                    "kind": "config",
                    "step": 0,
                    "run_id": self.run_id,
                    "resumed_from": str(resume_from) if resume_from else None,
                    "max_steps": self.max_steps,
                    "n_layers": n_layers,
                    "device": str(self.device),
                    "train_examples": len(self.train_dataset),
                    "eval_examples": len(self.eval_dataset) if self.eval_dataset else 0,
                    "lisa": dataclasses.asdict(self.lisa_config),
                    "args": dataclasses.asdict(args),
                }
            )
        logged_periods = len(self.controller.period_log)
        nonfinite_in_a_row = 0
        bar = tqdm(total=self.max_steps, initial=self.step, disable=not args.progress or not main, unit="step",
                   desc="LISA", dynamic_ncols=True)
        try:
            if resumed_at is None:  # under FSDP the forward passes all-gather: inside the failure handling below
                eval_loss = self.evaluate()
                if eval_loss is not None:
                    log.write({"kind": "eval", "step": 0, "eval_loss": eval_loss})
            while self.step < self.max_steps:
                rec = self.train_step()
                nonfinite_in_a_row = nonfinite_in_a_row + 1 if rec.get("skipped") else 0
                if rec["step"] % args.logging_steps == 0 or rec["step"] == self.max_steps or rec.get("skipped"):
                    log.write(rec)
                if nonfinite_in_a_row >= args.max_nonfinite_steps:
                    raise TrainingDiverged(
                        f"training diverged: the loss or gradient norm was not finite at steps "
                        f"{self.step - nonfinite_in_a_row + 1}-{self.step} (loss {rec['loss']}, gradient norm "
                        f"{rec['grad_norm']}), each skipped; stopped at step {self.step}. Try a lower learning rate "
                        f"than {args.learning_rate:g}; checkpoints written before are kept"
                    )
                for entry in self.controller.period_log[logged_periods:]:
                    log.write(period_record(entry, rec["step"]))
                logged_periods = len(self.controller.period_log)
                bar.update(1)
                bar.set_postfix(loss=f"{rec['loss']:.3f}", lr=f"{rec['lr']:.2e}", layers=",".join(map(str, rec["active_layers"])))
                at_end = self.step == self.max_steps
                if (args.eval_steps and self.step % args.eval_steps == 0) or at_end:
                    eval_loss = self.evaluate()
                    if eval_loss is not None:
                        log.write({"kind": "eval", "step": self.step, "eval_loss": eval_loss})
                if args.save_steps and self.step % args.save_steps == 0:
                    self.save_checkpoint()
            self.controller.finish(last_step=self.step - 1)  # a last, partial period gets its norms too
            for entry in self.controller.period_log[logged_periods:]:
                log.write(period_record(entry, self.step))
        except BaseException as error:
            if self.dist:
                explained = self.dist.explain_failure(error)
                if explained is not error:  # a collective inside FSDP's forward or backward: another rank failed
                    raise explained from error
                self.dist.report_failure(error)  # so the other ranks' failing collectives can say what happened here
            raise
        finally:
            bar.close()
            self._hand_back_model()  # before saving: the saved config's use_cache is the model's own
        if args.save_model:
            self.save_model(self.output_dir)
        if self.dist:  # the summary is read from rank 0's log; every rank returns rank 0's summary
            summary = self.dist.broadcast_object(self._summary(time.perf_counter() - wall_start) if main else None)
        else:
            summary = self._summary(time.perf_counter() - wall_start)
        log.write(summary)
        log.close()
        return summary

    def save_model(self, path: str | Path) -> None:
        """Hugging Face format (safetensors) with the tokenizer: ``AutoModelForCausalLM.from_pretrained(path)``.
        With several ranks every rank calls it (FSDP gathers the shards to rank 0) and rank 0 writes.

        Raises :class:`TrainingDiverged` (writing nothing) if a weight is not finite, and
        :class:`~lisa_trainer.checkpoint.CheckpointWriteError` if the files cannot be written."""
        path = Path(path)
        self._check_weights_finite(path)
        state_dict = self.dist.state_dict_to_save(self.model) if self.dist else None
        if self.dist and not self.dist.is_main:
            return  # every rank holds the same weights; rank 0 writes them
        kwargs = {}
        if "safe_serialization" in inspect.signature(self.model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # the default in recent transformers, where the flag is gone
        try:
            self.model.save_pretrained(path, state_dict=state_dict, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)
        except (OSError, RuntimeError, SafetensorError) as e:
            raise CheckpointWriteError(f"{path}: cannot write the model: {write_failure_reason(e, path)}") from e

    def _summary(self, wall: float) -> dict:
        log_path = self.output_dir / LOG_FILE
        records = read_log(log_path)
        steps = [r for r in records if r["kind"] == "step"]
        evals = [r for r in records if r["kind"] == "eval"]
        periods = [r for r in records if r["kind"] == "period"]
        summary = {
            "kind": "summary",
            "step": self.step,
            "steps": self.step,
            "skipped_steps": sum(1 for r in steps if r.get("skipped")),
            "first_loss": steps[0]["loss"] if steps else None,
            "last_loss": steps[-1]["loss"] if steps else None,
            "first_eval_loss": evals[0]["eval_loss"] if evals else None,
            "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
            "periods": [{"period": p["period"], "layers": p["layers"]} for p in periods],
            "tokens_seen": self.tokens_seen,
            "n_layers": self.controller.n_layers,
            "wall_time_s": wall,
            "device": str(self.device),
            "peak_host_rss_mb": _peak_host_rss_mb(),
        }
        if self.device.type == "cuda":
            summary["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return summary
