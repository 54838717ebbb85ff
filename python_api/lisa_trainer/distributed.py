"""Data-parallel LISA on torch.distributed: only the active layers' gradients cross the wire.

`LisaTrainer` (and so `lisa-finetune`) turns data-parallel by itself when it runs under a launcher that sets
``WORLD_SIZE`` > 1 with ``RANK`` and ``LOCAL_RANK`` (``torchrun``, ``torchrun --nnodes`` and ``accelerate launch``
do), or when the caller has already initialised a process group. Per optimizer step:

- **data**: the global micro-batch is ``per_device_train_batch_size x world_size`` examples of the same seeded
  order a single process would use; rank r trains rows ``[r*b, (r+1)*b)``. Each rank's loss is its tokens' share
  of the global token-mean (the divisor is the global trained-token count, one 2-number all-reduce), so the summed
  gradient is exactly the gradient of one process training the whole global batch: N ranks x batch b give the
  losses of 1 process x batch N*b, to fp32 rounding. Scaling out is a pure speed change.
- **gradients**: `gradient_sync.GradientSync` all-reduces the trainable parameters only (the active decoder layers plus the
  always-trainable embeddings, head and final norm), in ~25 MiB buckets launched from
  ``register_post_accumulate_grad_hook`` while the backward pass is still running. A frozen layer has no
  ``.grad`` and is in no bucket, so it costs no communication and there is no ``find_unused_parameters`` graph
  traversal; the buckets are rebuilt at every LISA switch (no weights are re-broadcast). For Llama-2-7B with
  E+H+2L that is 0.67 B of 6.74 B parameters: ~10 % of the bytes DDP over the whole model would move.
- **Hugging Face Trainer** (`LisaCallback`): the Trainer's DDP keeps one always-trainable parameter and the same
  `GradientSync` all-reduces the rest of the trainable set, averaged as DDP averages (`TrainerDataParallel`).
- **FSDP2** (``fsdp=True``): one ``fully_shard`` unit per decoder layer plus the root; FusedAdamW keeps moments for
  each rank's shards only (and parks those), and a frozen layer has no gradient, so no reduce-scatter. Update norms
  are summed from each rank's shards (one tiny all-reduce per period).
- **checkpoints** (:mod:`lisa_trainer.sharded_checkpoint`): every rank writes its own shards, data-parallel or
  FSDP, and a checkpoint resumes under any number of ranks, sharded or not; the final model of an FSDP run is
  gathered one tensor at a time and written once by rank 0.
- **schedule**: the layer schedule is a pure function of (seed, period); at each switch one all-gather of a
  per-layer mask checks that every rank samples the same layers (a mismatch names both ranks' layers).
- **writes**: rank 0 alone writes the log, the model and the plot; every rank ends with the same
  weights (same start, broadcast from rank 0; same summed gradients; same optimizer).
- **failures**: a rank that raises records its message in the process group's store before it exits; the others
  fail in their next collective (gloo: at once, when the peer's connection closes; NCCL: within
  ``ddp_timeout`` seconds) and raise `DistributedError` quoting the failing rank's message.
"""

from __future__ import annotations

import os
import traceback
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["DataParallel", "DistributedError", "OneProcess", "accelerate_fsdp", "launched_rank", "launched_world_size",
           "shutdown"]

DEFAULT_TIMEOUT_S = 1800  # Hugging Face TrainingArguments.ddp_timeout's default
_FAILURE_KEY = "lisa_trainer/failed/"


class DistributedError(RuntimeError):
    """A collective failed: another rank raised (its message is quoted), died, or the ranks disagree."""


def launched_world_size() -> int:
    """How many processes the launcher started (``WORLD_SIZE``, set by torchrun and accelerate); 1 when none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def launched_rank() -> int:
    """This process's rank as the launcher set it (``RANK``), before any process group exists; 0 when none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def shutdown() -> None:
    """Destroy the default process group if one is up (call once at the end of a data-parallel program)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


# accelerate launch's FSDP settings (its config file, passed to the program as environment variables) that our
# sharding can honour: variable -> (accepted values, lowercase; the setting as the config file names it). Every
# other setting is met by `DataParallel(fsdp=True)` or does not apply (wrap policy: one unit per decoder layer;
# state dict type: every rank writes its own shards of a checkpoint).
_ACCELERATE_FSDP_ACCEPTED = {
    "FSDP_OFFLOAD_PARAMS": ({"false", ""}, "fsdp_offload_params: true (lisa-finetune parks the frozen layers' "
                                           "optimizer state in host memory instead: --lisa_state_policy park)"),
    "FSDP_SHARDING_STRATEGY": ({"full_shard", "1", "none", ""}, "fsdp_sharding_strategy other than FULL_SHARD"),
    "FSDP_RESHARD_AFTER_FORWARD": ({"true", "full_shard", "1", "none", ""}, "fsdp_reshard_after_forward: false"),
    "FSDP_ACTIVATION_CHECKPOINTING": ({"false", ""}, "fsdp_activation_checkpointing: true (use "
                                                     "--gradient_checkpointing)"),
}


def accelerate_fsdp(environ=os.environ) -> tuple[bool, str | None]:
    """(whether ``accelerate launch`` was given an FSDP config, a line saying how it is met or None).

    Our FSDP2 sharding is the equivalent of the usual config (``FULL_SHARD``, ``TRANSFORMER_BASED_WRAP``): every
    parameter fully sharded, one unit per decoder layer plus the root. An FSDP1 config (``fsdp_version: 1``, as
    LMFlow's) gets FSDP2 with those settings and the line says so. A setting with no equivalent raises ValueError
    naming it, rather than training otherwise than asked."""
    if environ.get("ACCELERATE_USE_FSDP", "false").lower() not in ("true", "1"):
        return False, None
    refused = [what for var, (accepted, what) in _ACCELERATE_FSDP_ACCEPTED.items()
               if environ.get(var, "").strip().lower() not in accepted]
    if refused:
        raise ValueError(f"accelerate launch's FSDP config: {'; '.join(refused)} is not supported; lisa-finetune "
                         f"shards with FSDP2, fully (FULL_SHARD), one unit per decoder layer")
    version = environ.get("FSDP_VERSION", "1")
    if version == "2":
        return True, None
    return True, (f"accelerate's FSDP config (fsdp_version: {version}): lisa-finetune shards with FSDP2 instead, "
                  f"the equivalent of FULL_SHARD with TRANSFORMER_BASED_WRAP (set fsdp_version: 2 to say so)")


class DataParallel:
    """The collectives a data-parallel `LisaTrainer` needs; one per trainer. Use `DataParallel.setup`."""

    sharded_checkpoints = True  # every rank writes its own part of a checkpoint (lisa_trainer.sharded_checkpoint)

    def __init__(self, device: torch.device, fsdp: bool = False):
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        self.device = device
        self.fsdp = fsdp
        self.model: nn.Module | None = None
        # NCCL only moves CUDA tensors; gloo only CPU ones (for tiny tensors both are right where they are used).
        self._comm_device = device if dist.get_backend() == "nccl" else torch.device("cpu")
        self.grad_sync = None  # a gradient_sync.GradientSync without FSDP, once attached
        self._last_switch = None

    @classmethod
    def setup(cls, device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S, *,
              fsdp: bool = False) -> tuple[DataParallel | OneProcess, torch.device]:
        """(a DataParallel, this rank's device) under a launcher with WORLD_SIZE > 1 or an initialised process
        group of more than one rank; (a `OneProcess`, device) otherwise. Initialises the default group if needed: NCCL for
        CUDA, gloo for CPU, collective timeout ``timeout_s`` seconds. ``device`` "cuda" becomes ``cuda:LOCAL_RANK``.
        ``fsdp`` shards the model with FSDP2 (`attach`)."""
        if launched_world_size() <= 1:
            if fsdp:
                warnings.warn("fsdp shards over several ranks (start with torchrun); one process trains unsharded",
                              stacklevel=3)
            return OneProcess(), device
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
            if missing:
                raise DistributedError(
                    f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: start the program "
                    f"with torchrun (or accelerate launch), which sets them")
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
        return cls(device, fsdp), device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    # ---------------------------------------------------------------------------------------------- set up
    def attach(self, model: nn.Module, layers: nn.ModuleList | tuple = (), **sync_options) -> None:
        """Start every rank from rank 0's weights and buffers; then hook the gradient all-reduce into `model`
        (`GradientSync`, given `sync_options`), or with FSDP shard it: one FSDP2 unit per decoder layer in
        `layers`, plus the root (embeddings, head, final norm). Call before building the optimizer: sharding
        replaces the parameters with DTensors. With FSDP the model may still be on the CPU: each unit moves to the
        device as it is sharded, so a model larger than one GPU never sits on one whole."""
        with torch.no_grad():
            for t in list(model.parameters()) + list(model.buffers()):
                on_comm = t.data if t.device == self._comm_device else t.data.to(self._comm_device)
                self.collective("broadcast of the initial weights", dist.broadcast, on_comm, src=0)
                if on_comm is not t.data:
                    t.data.copy_(on_comm)
        self.model = model
        if not self.fsdp:
            from .gradient_sync import GradientSync

            self.grad_sync = GradientSync(model, self, **sync_options)
            return
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world_size,))
        for layer in layers:
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)

    def check_batches(self, n_examples: int, global_batch_size: int) -> None:
        """FSDP runs every layer's all-gather on every rank, so every rank needs data in every micro-batch."""
        last = n_examples % global_batch_size
        per_rank = -(-last // self.world_size)  # as `shard` cuts it: the last rank gets the fewest
        if self.fsdp and last and (self.world_size - 1) * per_rank >= last:
            raise ValueError(
                f"fsdp: the last micro-batch of each epoch has {last} examples, fewer than one per rank for some of "
                f"the {self.world_size} ranks; choose a per-device batch size or a dataset size that leaves each "
                f"rank at least one example ({n_examples} examples, global batch {global_batch_size})")

    def shard(self, items: list) -> list:
        """This rank's contiguous share of a global batch of ``len(items)`` = b x world_size (or fewer) items."""
        per_rank = -(-len(items) // self.world_size)
        return items[self.rank * per_rank:(self.rank + 1) * per_rank]

    # ------------------------------------------------------------------------------------------ collectives
    def sum(self, *values: float) -> list[float]:
        """Sum plain numbers over the ranks (one small all-reduce, fp64)."""
        t = torch.tensor(values, dtype=torch.float64, device=self._comm_device)
        self.collective("all-reduce of step counters", dist.all_reduce, t)
        return t.tolist()

    def broadcast_object(self, obj):
        """Rank 0's `obj` on every rank (pickled; for small results such as the run summary)."""
        box = [obj]
        self.collective("broadcast of rank 0's result", dist.broadcast_object_list, box, src=0)
        return box[0]

    def barrier(self, what: str) -> None:
        self.collective(what, dist.barrier)

    def check_schedule(self, active_units, n_units: int, settings: tuple[int, ...] = (), unit: str = "layers") -> None:
        """One all-gather of (settings..., per-unit mask): every rank must train the same units (decoder layers, or
        modules with module-wise sampling: `unit` names them) this period, under the same schedule settings (period,
        seed, interval: a rank that switched at another step would pair its collectives with the wrong ones of the
        others)."""
        mask = [0] * n_units
        for i in active_units:
            mask[i] = 1
        mine = torch.tensor([*settings, *mask], dtype=torch.int64, device=self._comm_device)
        gathered = [torch.empty_like(mine) for _ in range(self.world_size)]
        self.collective("LISA schedule check", dist.all_gather, gathered, mine)
        seen = [(g[:len(settings)].tolist(), torch.nonzero(g[len(settings):]).flatten().tolist()) for g in gathered]
        for r, theirs in enumerate(seen):
            if theirs != seen[0]:
                raise DistributedError(
                    f"LISA schedule differs between ranks: rank 0 trains {unit} {seen[0][1]} (settings {seen[0][0]}), "
                    f"rank {r} trains {theirs[1]} (settings {theirs[0]}). Every rank needs the same LisaConfig "
                    f"(seed, n_active_layers, interval_steps, layer_weights) and model")

    def on_step_begin(self, active_units, n_units: int, *, period: int | None = None,
                      settings: tuple[int, ...] = (), unit: str = "layers") -> None:
        """After the controller's `on_step_begin`: at a switch (a new `period`, or new units when no period is
        given), check the schedule with `check_schedule` and rebuild the gradient buckets."""
        switch = (period, tuple(active_units)) if period is not None else tuple(active_units)
        if switch != self._last_switch:
            self.check_schedule(active_units, n_units, settings if period is None else (period, *settings), unit)
            if self.grad_sync is not None:
                self.grad_sync.rebuild()
            self._last_switch = switch

    @property
    def comm_record_key(self) -> str:
        """The step record's name for the gradient bytes communicated per step."""
        return "reduce_scatter_bytes" if self.fsdp else "allreduce_bytes"

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        """``loss.backward()`` for one micro-batch; gradients are communicated in the ``last`` one only."""
        if self.fsdp:
            self.model.set_requires_gradient_sync(last)
            # FSDP2 averages over the ranks (gloo cannot do its pre-multiplied sum); `loss` is this rank's share
            # of the global mean, whose gradients must be summed.
            (loss * self.world_size).backward()
        else:
            self.grad_sync.armed = last
            loss.backward()

    def finish_gradients(self) -> dict:
        """After the step's last backward: complete the communication; returns the step record's figures of it (the
        gradient bytes sent, under `comm_record_key`, and the number of ranks)."""
        if self.fsdp:  # each trainable parameter's full gradient goes into one reduce-scatter
            sent = sum(p.numel() * p.element_size() for p in self.model.parameters() if p.grad is not None)
        else:
            sent = self.grad_sync.finish()
        return {self.comm_record_key: sent, "world_size": self.world_size}

    def eval_batches(self, starts: range) -> range:
        """This rank's share of the held-out batches (all of them with FSDP: every rank runs every forward)."""
        return starts if self.fsdp else starts[self.rank::self.world_size]

    def eval_sums(self, total: float, count: int) -> tuple[float, int]:
        if self.fsdp:
            return total, count
        total, count = self.sum(total, count)
        return total, int(count)

    # ------------------------------------------------------------------------------------------- failures
    def report_failure(self, error: BaseException) -> None:
        """Leave this rank's error where the other ranks look when their next collective fails."""
        if isinstance(error, DistributedError):
            return  # a consequence of another rank's failure, already reported there
        store = _default_store()
        if store is None:
            return
        message = "".join(traceback.format_exception_only(type(error), error)).strip()
        try:
            store.set(f"{_FAILURE_KEY}{self.rank}", message)
        except Exception:  # noqa: BLE001 - the store may be gone with rank 0; the traceback still prints here
            pass

    def explain_failure(self, error: BaseException) -> BaseException:
        """`error` as this rank reports it: a failed collective that did not go through `_collective` (FSDP2's
        all-gathers and reduce-scatters inside forward and backward, the all-reduces of sharded gradient norms and
        update norms) becomes the `DistributedError` every other collective gives; any other error stays itself."""
        if isinstance(error, DistributedError) or not _is_communication_failure(error):
            return error
        return self._explain("a collective of the training step", error)

    def collective(self, what: str, fn, *args, **kwargs):
        """`fn(*args, **kwargs)`, a collective; its failure becomes a `DistributedError` that says what failed (and
        which rank's error caused it, where that rank left one)."""
        try:
            return fn(*args, **kwargs)
        except (RuntimeError, dist.DistError) as err:
            raise self._explain(what, err) from err

    def _explain(self, what: str, err: BaseException) -> DistributedError:
        failed = _failures(self.world_size)
        if failed:
            said = "; ".join(f"rank {r} failed: {msg}" for r, msg in failed.items())
            return DistributedError(f"rank {self.rank}: {what} did not complete because {said}")
        return DistributedError(
            f"rank {self.rank}: {what} failed ({str(err).strip().splitlines()[0][:300]}); another rank probably "
            f"died or stalled past the collective timeout (--ddp_timeout)")


class OneProcess:
    """The `DataParallel` of a run in one process: the same calls, each what it is with a single rank (a collective
    gives back what it is given, a barrier does not wait, nothing is gathered or sharded), so the training loop has
    one path."""

    rank, world_size, is_main, fsdp = 0, 1, True, False
    sharded_checkpoints = False  # one process writes the one-file checkpoint (lisa_trainer.checkpoint)

    def attach(self, model: nn.Module, layers=(), **sync_options) -> None:
        pass

    def check_batches(self, n_examples: int, global_batch_size: int) -> None:
        pass

    def shard(self, items: list) -> list:
        return items

    def sum(self, *values: float) -> list[float]:
        return list(values)

    def broadcast_object(self, obj):
        return obj

    def barrier(self, what: str) -> None:
        pass

    def on_step_begin(self, active_units, n_units: int, **schedule) -> None:
        pass

    def backward(self, loss: torch.Tensor, *, last: bool) -> None:
        loss.backward()

    def finish_gradients(self) -> dict:
        return {}

    def eval_batches(self, starts: range) -> range:
        return starts

    def eval_sums(self, total: float, count: int) -> tuple[float, int]:
        return total, count

    def report_failure(self, error: BaseException) -> None:
        pass

    def explain_failure(self, error: BaseException) -> BaseException:
        return error


def _is_communication_failure(error: BaseException) -> bool:
    """A collective that failed, not this rank's own error: NCCL raises torch's DistError; gloo a RuntimeError from
    its transport (a peer's connection closed or reset, a receive timed out), whose message names its source."""
    return isinstance(error, dist.DistError) or (isinstance(error, RuntimeError) and "gloo/transport/" in str(error))


def _default_store():
    try:
        return dist.distributed_c10d._get_default_store()
    except (RuntimeError, AttributeError, ValueError):
        return None


def _failures(world_size: int) -> dict[int, str]:
    store = _default_store()
    if store is None:
        return {}
    found = {}
    for r in range(world_size):
        key = f"{_FAILURE_KEY}{r}"
        try:
            if store.check([key]):
                found[r] = store.get(key).decode(errors="replace")
        except Exception:  # noqa: BLE001 - the store went down with its host rank; nothing more to learn
            break
    return found
