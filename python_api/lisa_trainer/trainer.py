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

The file (~490 lines) is the loop and what shares its state (step, data position, run id): evaluation, saving and
resuming. Options live in `arguments`, the memory features in `memory`, checkpoint formats in `checkpoint` and
`sharded_checkpoint`, communication in `distributed`.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pickle
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError

from .arguments import LisaConfig, LisaTrainingArguments
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
from .controller import LisaController
from .data import IGNORE_INDEX, Collator, TokenizedDataset, pad_token_id
from .distributed import DataParallel, launched_world_size
from .layers import find_decoder_layers
from .memory import MemoryFeatures
from .run_folder import RunClaim, claim_output_dir, log_run_id
from .runlog import LOG_FILE, JsonlLog, NullLog, period_record, read_log, summary_record
from .trackers import Trackers, parse_report_to

__all__ = ["LisaTrainer", "LisaTrainingArguments", "TrainingDiverged", "lr_at"]


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
        MemoryFeatures.check(lisa_config, args, launched_world_size())  # before any process group or model move
        self.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # Under torchrun/accelerate (WORLD_SIZE > 1): data-parallel, see distributed.py; a OneProcess otherwise.
        self.dist, self.device = DataParallel.setup(self.device, args.ddp_timeout, fsdp=args.fsdp)
        self.use_bf16 = args.bf16 and self.device.type == "cuda"
        if args.bf16 and not self.use_bf16:
            dtype = next(model.parameters()).dtype
            warnings.warn(f"bf16 autocast is used on CUDA only: on {self.device.type} the model trains in the dtype "
                          f"it was loaded in ({str(dtype).removeprefix('torch.')})", stacklevel=2)
        # FSDP moves the model to the device unit by unit as it shards it (attach).
        self.model = model if self.dist.fsdp else model.to(self.device)
        # Before the optimizer: FSDP replaces the parameters with their shards.
        self.dist.attach(model, find_decoder_layers(model, lisa_config.layers_attribute)[1])
        self.memory = MemoryFeatures(model, lisa_config, args, processes=self.dist.world_size, fsdp=self.dist.fsdp)
        self.lisa_config, self.optimizer = self.memory.config, self.memory.optimizer
        self.memory.take_model()
        self._holds_model = True
        self.controller = LisaController(model, self.optimizer, self.lisa_config)
        self.memory.attach(self.controller)
        self.collator = Collator(pad_token_id(tokenizer))
        # One global micro-batch is split over the ranks, so the batch sequence does not depend on their number.
        self.global_batch_size = args.per_device_train_batch_size * self.dist.world_size
        self.batches_per_epoch = math.ceil(len(train_dataset) / self.global_batch_size)
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
        order = self.dist.shard(order)
        return self.collator([self.train_dataset[i] for i in order]) if order else None

    # ------------------------------------------------------------------------------------------------- steps

    def _autocast(self):
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.use_bf16)

    def _loss_sum(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Summed next-token cross-entropy over the batch's trained tokens (fp32 logits)."""
        with self._autocast():
            loss = self.memory.chunked_loss(batch) if self.memory.chunked_loss else None
            if loss is not None:
                return loss
            logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"][:, 1:]
        return F.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
        )

    def train_step(self) -> dict:
        """One optimizer step; returns its log record."""
        args, step = self.args, self.step
        started = time.perf_counter()
        if not self._holds_model:  # handed back by an earlier train(); the controller sets up its part itself
            self.memory.take_model()
            self._holds_model = True
        self.controller.on_step_begin(step)
        lr = lr_at(step, base_lr=args.learning_rate, total_steps=self.max_steps, warmup_steps=self.warmup_steps, kind=args.lr_scheduler_type)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accum = args.gradient_accumulation_steps
        batches = [b for b in (self.micro_batch(step * accum + j) for j in range(accum)) if b is not None]
        n_trained = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        n_tokens = sum(int(b["attention_mask"].sum()) for b in batches)
        c = self.controller  # every rank checks it trains what the others do
        self.dist.on_step_begin(c.active_units, c.n_units, period=c.period,
                                settings=(self.lisa_config.seed, self.lisa_config.interval_steps), unit=c.unit_name)
        # Every rank divides by the global count: the summed gradient is the global token-mean's.
        n_trained, n_tokens = (int(n) for n in self.dist.sum(n_trained, n_tokens))
        self.model.train()
        loss_total = 0.0
        for i, b in enumerate(batches):
            b = {k: v.to(self.device, non_blocking=True) for k, v in b.items()}
            loss = self._loss_sum(b) / max(1, n_trained)
            loss_value = loss.item()
            # Gradients are communicated during the last backward only.
            self.memory.backward.backward(loss, loss_value, self.dist, last=i == len(batches) - 1)
            loss_total += loss_value
            self.memory.after_backward()
        communicated = self.dist.finish_gradients()
        (loss_total,) = self.dist.sum(loss_total)
        grad_norm, finite = self.memory.backward.step(self.model, loss_total)
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
        record.update(communicated)
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
        for i in self.dist.eval_batches(starts):
            b = self.collator([self.eval_dataset[j] for j in range(i, min(i + bs, len(self.eval_dataset)))])
            count += int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
            total += float(self._loss_sum({k: v.to(self.device) for k, v in b.items()}))
        self.memory.after_backward()  # an evaluation's forward passes bring offloaded layers in too
        total, count = self.dist.eval_sums(total, count)
        self.model.train()
        return total / max(1, count)

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
                "world_size": self.dist.world_size,
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
        if self.dist.sharded_checkpoints:  # every rank writes its own shards; rank 0 renames the folder into place
            from .sharded_checkpoint import save_sharded_checkpoint

            save_sharded_checkpoint(path, model=self.model, optimizer=self.optimizer, controller=self.controller,
                                    state=self._trainer_state(), parallel=self.dist, tokenizer=self.tokenizer,
                                    run_id=self.run_id)
        else:
            save_checkpoint(path, model=self.model, optimizer=self.optimizer, controller=self.controller,
                            state=self._trainer_state(), tokenizer=self.tokenizer, run_id=self.run_id)
        if self.dist.is_main:
            prune_checkpoints(self.output_dir, self.args.save_total_limit, self.run_id)
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
        from .sharded_checkpoint import is_sharded_checkpoint, load_sharded_checkpoint

        try:
            if is_sharded_checkpoint(checkpoint):  # written under torchrun: each rank reads what its shards need
                state = load_sharded_checkpoint(checkpoint, model=self.model, optimizer=self.optimizer,
                                                controller=self.controller, memory=self.memory,
                                                parallel=self.dist if self.dist.sharded_checkpoints else None)
            else:
                state = load_checkpoint(checkpoint, model=self.model, optimizer=self.optimizer,
                                        controller=self.controller, memory=self.memory, sharded=self.dist.fsdp)
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
        if state["seed"] != self.args.seed:
            warnings.warn(f"resuming with seed {self.args.seed}, checkpoint used {state['seed']}: data order changes", stacklevel=2)
        if state["max_steps"] != self.max_steps:
            warnings.warn(f"max_steps {self.max_steps} differs from the checkpoint's {state['max_steps']}: the lr schedule changes", stacklevel=2)
        self._warn_if_batching_changed(state, state["step"])
        self.step, self.tokens_seen = state["step"], state["tokens_seen"]
        return self.step

    def train(self, resume_from_checkpoint: str | Path | None = None, *, claim: RunClaim | None = None) -> dict:
        """Run to ``max_steps``; returns the summary (also the log's last record). ``resume_from_checkpoint``: a
        checkpoint folder, or "latest" (the newest checkpoint of the run logged in ``output_dir``). ``claim``: the
        output folder's claim when the caller already holds it (`run_folder.claim_output_dir`, as `lisa-finetune`
        does before loading the model); the run then follows it and ``resume_from_checkpoint`` is not read.

        Afterwards, also when it fails, the model is handed back as it was given (see `_hand_back_model`)."""
        try:
            if not self.dist.is_main:  # rank 0 holds the folder and decides the run; the others follow
                return self._train_claimed(self.dist.broadcast_object(None))
            if claim is not None:
                return self._train_claimed(self.dist.broadcast_object(claim))
            with claim_output_dir(self.output_dir, resume_from=resume_from_checkpoint or None,
                                  overwrite=self.args.overwrite_output_dir) as claim:
                return self._train_claimed(self.dist.broadcast_object(claim))
        finally:
            self._hand_back_model()

    def _train_claimed(self, claim: RunClaim) -> dict:
        self.run_id = claim.run_id
        return self._train(claim.resume_from)

    def _hand_back_model(self) -> None:
        """The model as it was given: every weight on its device (none offloaded, no offload hooks), `requires_grad`
        of every parameter, the input embedding's `sparse` flag, gradient checkpointing and `use_cache` as before
        this trainer. The next step sets them up again."""
        self.controller.release_model()
        self.memory.release_model()
        self._holds_model = False

    def _train(self, resume_from: Path | None) -> dict:
        from tqdm.auto import tqdm

        args = self.args
        wall_start = time.perf_counter()
        if resume_from:
            self.resume(resume_from)
        resumed_at = self.step if resume_from else None
        own_log = resumed_at is not None and log_run_id(self.output_dir) == self.run_id
        main = self.dist.is_main
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
        # The summary is read from rank 0's log; every rank returns rank 0's summary.
        summary = self.dist.broadcast_object(self._summary(time.perf_counter() - wall_start) if main else None)
        log.write(summary)
        log.close()
        return summary

    def save_model(self, path: str | Path) -> None:
        """Hugging Face format (safetensors) with the tokenizer: ``AutoModelForCausalLM.from_pretrained(path)``.
        With several ranks every rank calls it and rank 0 writes (FSDP gathers one weight at a time to rank 0:
        `lisa_trainer.fsdp_weights.save_sharded_model`).

        Raises :class:`TrainingDiverged` (writing nothing) if a weight is not finite, and
        :class:`~lisa_trainer.checkpoint.CheckpointWriteError` if the files cannot be written."""
        path = Path(path)
        self._check_weights_finite(path)
        if self.dist.fsdp:
            from .fsdp_weights import save_sharded_model

            save_sharded_model(self.model, path, self.dist, tokenizer=self.tokenizer)
            return
        if not self.dist.is_main:
            return  # every rank holds the same weights; rank 0 writes them
        kwargs = {}
        if "safe_serialization" in inspect.signature(self.model.save_pretrained).parameters:
            kwargs["safe_serialization"] = True  # the default in recent transformers, where the flag is gone
        try:
            self.model.save_pretrained(path, **kwargs)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(path)
        except (OSError, RuntimeError, SafetensorError) as e:
            raise CheckpointWriteError(f"{path}: cannot write the model: {write_failure_reason(e, path)}") from e

    def _summary(self, wall: float) -> dict:
        summary = summary_record(read_log(self.output_dir / LOG_FILE), step=self.step, tokens_seen=self.tokens_seen,
                                 n_layers=self.controller.n_layers, wall_time_s=wall, device=str(self.device))
        if self.device.type == "cuda":
            summary["gpu_mem_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        return summary
