"""Memory of full fine-tuning, LoRA and LISA at 7B, 8B and 70B without a GPU: the real code, run on the meta device.

Tensors on PyTorch's `meta` device have a shape and a dtype but no data, so even Llama-2-70B costs nothing to build.
This benchmark builds each model on `meta` with transformers (bf16 weights), sets each method up exactly as
bench_finetune.py does (torch AdamW; peft LoRA; lisa_trainer.build_optimizer + LisaController; the public
implementations' `requires_grad` toggling), runs a long LISA schedule through that code, and after each period counts
the bytes resident on the device:

- params: the model's parameters as built;
- grads: every parameter that requires a gradient after peft's or the controller's freezing gets
  `.grad = torch.empty_like(p)`, which is what backward leaves on a leaf parameter (same shape and dtype). A whole
  model's forward does not run on meta (transformers' mask code reads a value with `.item()`); on the tiny shape the
  tests run a real forward/backward on CPU instead and find the same bytes. An input embedding with a row-sparse
  gradient (`LisaConfig(sparse_embedding_grad=True)`) gets a COO gradient with one row (and an int64 index) per
  token of the step; the step is the batch the CPU run uses, one token per assumed touched row plus one;
  with the step inside backward (`optimizer_in_backward`), the gradients are counted where the most are alive: as
  each tensor's gradient arrives, the others already freed;
- optimizer_state: what the optimizer's own `step()` allocated (FusedAdamW's `_state_for_step`, torch AdamW's state)
  after the controller's policy parked, dropped or kept it;
- prefetched: with "park" the controller starts bringing the next period's incoming layers back one step before the
  switch (`prefetch_steps=1`); on a GPU those copies sit on the device beside the active state during that step;
- host: bytes parked in the host state bank;
- offload_staging: with frozen layers' weights in host memory (`LisaConfig(offload_frozen_layers=...)`,
  `lisa_trainer.frozen_weights`), what they hold on the device while they compute: the computing layer and the
  prefetched next one. Their params are then counted as the package leaves them between steps: released.

Two steps are run per period (its first, where the switch happens, and its last, where the prefetch happens); the
other steps of a period allocate nothing new. Full fine-tuning and LoRA train the same tensors at every step, so one
period of theirs is measured (torch AdamW on meta costs ~1 ms per tensor and step). Parking goes through FusedAdamW's
public park/unpark/prefetch hooks into `SizeOnlyStateBank`, a HostStateBank that records what would be parked (shape,
dtype) instead of copying data, which meta tensors do not have.

Activations are not in those figures; they are estimated for `--seq-len` x `--batch-size` with gradient
checkpointing of every decoder layer (how LISA and LoRA are run at these sizes), from what autograd saves, measured on
meta with saved-tensor hooks (parameters excluded, shared storage counted once):

    checkpoints  = n_layers x batch x seq x hidden x 2 bytes   (each decoder layer's bf16 input, kept for recompute)
    layer        = the largest decoder layer's saved tensors    (one layer is recomputed at a time in backward)
    head         = final norm + LM head + transformers' loss: its saved tensors, where the fp32 log-probabilities
                   (tokens x vocab x 4 bytes) count 3 times: saved, plus the incoming gradient and the result of the
                   cross-entropy backward, alive together
    head_chunked = the same with the vocabulary-wide terms for `--loss-chunk` tokens instead of all of them
                   (a loss computed over chunks of tokens fused with the LM head)
    activations  = checkpoints + max(layer, head)              (the head's buffers are gone before layers recompute)

Attention is measured through the flash-attention op (`aten._scaled_dot_product_flash_attention`, what SDPA runs on
a GPU in bf16: no seq x seq matrix is saved) with k/v repeated to every head, an upper bound where the kernel reads
grouped k/v directly. Not counted: a layer's backward temporaries (a few batch x seq x intermediate buffers),
the CUDA context, allocator fragmentation. "total" adds the peak device state (after the optimizer step, all
gradients alive) to the activation peak, so it is an upper bound of what the two add up to at any one time.

Row-sparse embedding state keeps moments for the rows (tokens) the data touches, which is data-dependent: meta
tensors have no data, so on meta a run is assumed to touch `--touched-rows` of the vocabulary (default 5%) from its
first step on, and no more later (the state of the final set, counted from the start: an upper bound at each step).
5% is an assumption, not a count: an instruction-tuning set in one language uses a few thousand distinct tokens of
Llama-3's 128,256 (5% = 6,413 rows; Llama-2's 32,000: 1,600), and the data shipped with the package cannot be run
through those tokenizers without a download. On real tensors (the tests' CPU runs) the batch touches exactly that
many rows, so the two agree. The LISA variants other than the row-sparse ones keep dense embedding state, so each
saving is listed on its own.

Sharded over ranks (`--fsdp-ranks 2,4,8,16,64`): each variant is also run with its model sharded by FSDP2 as
`lisa_trainer.distributed.DataParallel(fsdp=True).attach` shards it (one unit per decoder layer plus the root; LoRA:
after peft has wrapped the layers, the optimizer built over the shards), in a process group of N ranks on torch's
"fake" backend (`torch.testing._internal.distributed.fake_pg`: collectives return at once and move nothing), with
WORLD_SIZE and RANK set as torchrun sets them. The parameters become DTensors holding rank 0's shard, and the same
schedule through the same code counts that rank's bytes: weights, gradients (after their reduce-scatter), moments,
prefetched and parked moments. Rank 0 holds the largest shards (dim 0 is cut in pieces of ceil(rows / N) rows); the
JSON lists the parameters that do not split evenly (at 70B on 2 to 64 ranks: none). FSDP2 refuses to gather meta
parameters, so what it holds beyond the shards during a step is derived from the shards (`memory_fsdp.fsdp_figures`):
the root (embedding, final norm, head) gathered from forward through backward, two decoder layers gathered (the
computing one and the prefetched next), and the whole gradients of the root's trainable parameters and of the
largest trainable layer before their reduce-scatter. Activations are those of one rank's micro-batch, which sharding
does not change: the unsharded run's. A node's host bytes are min(N, `--ranks-per-node`) x rank 0's parked moments;
the pinned arena that holds them is counted by the bank's own allocator (`SizeOnlyStateBank`). Variants that run in
one process only (the step inside backward, frozen-weight offload, row-sparse embedding state) are not sharded.

Variants are one entry each in VARIANTS: a bench_finetune method plus FusedAdamW arguments, so a new optimizer option
(e.g. a per-group state dtype or a row-sparse embedding state) is measured by adding one line.

The fake process group and FSDP2's gathered terms are in benchmarks/memory_fsdp.py; the rest stays in this one file
because the size-only bank, the schedule, the activation estimate and the tables are each used only by `account` and
its report, and read in that order they are one path from a VARIANTS entry to a table row.

    python -m benchmarks.bench_memory                              # 7b, 8b, 70b; 100 periods, γ=2
    python -m benchmarks.bench_memory --shapes 8b --variants lisa-park,lisa-park-bf16-moments,lora
    python -m benchmarks.bench_memory --shapes 70b --variants full,lora,lisa-park --fsdp-ranks 2,4,8,16,64 --periods 240
"""
from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from benchmarks.bench_finetune import (
    SHAPES,
    build_model,
    device_state_breakdown,
    setup_method,
    torch_adamw,
)
from benchmarks.common import environment, print_table, save_results
from benchmarks.memory_fsdp import fake_world, fsdp_figures, shard
from lisa_kernels import HostStateBank, sparse_rows
from lisa_kernels.host_arena import Arena, ChunkSource, Slot

GB = 1e9
DTYPE = torch.bfloat16
RESIDENT_KEYS = ("params", "grads", "optimizer_state")
STATE_KEYS = (*RESIDENT_KEYS, "prefetched", "offload_staging")

# Figures the paper reports (Pan et al. 2024, peak GPU memory). Its 70B runs split the model over several GPUs, so
# only the LISA / LoRA ratio compares with the single-device totals here.
PAPER = {
    "7b": "LISA (E+H+2L) fits a 24 GB card",
    "70b": "LISA (E+H+2L) 75 GB vs LoRA r128 79 GB (ratio 0.95)",
}


@dataclass(frozen=True)
class Variant:
    method: str                                    # a bench_finetune method
    optimizer: dict = field(default_factory=dict)  # extra FusedAdamW arguments (our LISA methods only)
    settings: dict = field(default_factory=dict)   # bench_finetune arguments to override, e.g. prefetch_steps
    note: str = ""


VARIANTS = {
    "full": Variant("full", note="torch AdamW over everything (bf16 moments for bf16 weights)"),
    "lora": Variant("lora", note="peft LoRA on all linear layers (fp32 adapters, as peft makes them), torch AdamW"),
    "lisa-park": Variant("lisa-park", note="ours: frozen layers' moments parked in host memory (fp32 moments)"),
    "lisa-reset": Variant("lisa-reset", note="ours: frozen layers' moments dropped"),
    "lisa-keep": Variant("lisa-keep", note="ours: moments of every layer ever sampled stay on the device"),
    "lisa-public": Variant("lisa-public",
                           note="requires_grad toggling; torch AdamW keeps every state (LMFlow, Axolotl)"),
    "lisa-park-bf16-moments": Variant("lisa-park", {"state_dtype": torch.bfloat16},
                                      note="ours, park, FusedAdamW(state_dtype=torch.bfloat16)"),
    "lisa-park-no-prefetch": Variant("lisa-park", settings={"prefetch_steps": 0},
                                     note="ours, park, LisaConfig(prefetch_steps=0): the switch waits for the copy"),
    "lisa-park-bf16-moments-no-prefetch": Variant("lisa-park", {"state_dtype": torch.bfloat16},
                                                  {"prefetch_steps": 0}, note="both of the above"),
    "lisa-park-sparse-embedding": Variant("lisa-park", settings={"lisa_config": {"sparse_embedding_state": True}},
                                          note="ours, park, row-sparse input-embedding moments (the build_optimizer "
                                               "default; touched rows assumed, see --touched-rows)"),
    "lisa-park-sparse-embedding-grad": Variant(
        "lisa-park", settings={"lisa_config": {"sparse_embedding_state": True, "sparse_embedding_grad": True}},
        note="ours, park, row-sparse embedding state and gradient (the LisaTrainer default on one process): one "
             "gradient row per token of the step"),
    "lisa-park-bf16-embedding-head": Variant("lisa-park", settings={"lisa_config": {"embedding_state_dtype": "bfloat16"}},
                                             note="ours, park, LisaConfig(embedding_state_dtype='bfloat16'): bf16 "
                                                  "moments for embedding and head, fp32 for decoder layers"),
    "lisa-park-sparse-bf16-embedding-head": Variant(
        "lisa-park", settings={"lisa_config": {"sparse_embedding_state": True, "embedding_state_dtype": "bfloat16"}},
        note="both of the above"),
    "lisa-park-sparse-bf16-moments-no-prefetch": Variant(
        "lisa-park", {"state_dtype": torch.bfloat16},
        {"prefetch_steps": 0, "lisa_config": {"sparse_embedding_state": True}},
        note="every saving: row-sparse embedding, bf16 moments everywhere, no prefetch"),
    "lisa-park-step-in-backward": Variant(
        "lisa-park", settings={"optimizer_in_backward": True},
        note="ours, park, the optimizer step inside backward (lisa_kernels.StepInBackward): one gradient alive at a "
             "time"),
    "lisa-park-offload-frozen": Variant(
        "lisa-park", settings={"lisa_config": {"offload_frozen_layers": "all"}},
        note="ours, park, every frozen layer's weights in host memory (LisaConfig(offload_frozen_layers=n_layers)), "
             "two layers on the device while they compute"),
    "lisa-park-exact-savings-offload-frozen": Variant(
        "lisa-park", settings={"lisa_config": {"sparse_embedding_state": True, "sparse_embedding_grad": True,
                                               "offload_frozen_layers": "all"}},
        note="the LisaTrainer defaults (row-sparse embedding state and gradient, fp32 moments, prefetch) and every "
             "frozen layer's weights in host memory: exact savings only"),
    "lisa-park-every-saving-offload-frozen": Variant(
        "lisa-park", {"state_dtype": torch.bfloat16},
        {"prefetch_steps": 0, "lisa_config": {"sparse_embedding_state": True, "sparse_embedding_grad": True,
                                              "offload_frozen_layers": "all"}},
        note="every saving and every frozen layer's weights in host memory"),
    "lisa-park-every-saving-step-in-backward-offload-frozen": Variant(
        "lisa-park", {"state_dtype": torch.bfloat16},
        {"prefetch_steps": 0, "optimizer_in_backward": True,
         "lisa_config": {"sparse_embedding_state": True, "sparse_embedding_grad": True, "offload_frozen_layers": "all"}},
        note="every saving, the step inside backward, every frozen layer's weights in host memory"),
}
# Methods whose trainable set never changes allocate nothing new after their first step: one period is measured.
STATIC_METHODS = ("full", "lora")


# ----------------------------------------------------------------------------------------------------------------
# Parking without data


class MetaChunkSource(ChunkSource):
    """The pinned chunks the real bank's arena would take, sized as its source sizes them (the native extension:
    the bytes asked for, page-rounded; plain PyTorch: a power of two), made of meta bytes that cost nothing."""

    def __init__(self, native: bool):
        # ChunkSource sizes by whether it has the native ops; only their presence is read here, never a call.
        super().__init__(ops=True if native else None, pinned=True)

    def alloc(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, device="meta")


class SizeOnlyStateBank(HostStateBank):
    """A HostStateBank that records what is parked (shape, dtype, device) instead of copying it: meta tensors have
    no data to copy, and a 70B model's parked moments (~0.5 TB) would not fit in this host anyway.

    `restore` hands back an uninitialised tensor of the parked shape and dtype; `prefetch` allocates that tensor on
    the device ahead of time and keeps it until `restore`, as the real bank does on a GPU, so `prefetched_bytes`
    counts what a prefetch holds on the device. Every park and release also goes through the real bank's arena
    allocator (`host_arena.Arena`, 64 MiB growth steps, 256-byte slots) over meta chunks, once sized as the native
    extension allocates and once as plain PyTorch's pinned allocator does: `arena_bytes` and `torch_arena_bytes`
    are the page-locked memory the real bank would hold for the same parks, with and without the extension. Like
    LisaTrainer's bank, it grows as it parks: `reserve` is not modelled (bench_finetune's up-front reservation)."""

    def __init__(self, chunk_bytes: int = 64 << 20):
        super().__init__(backend="fallback", pin=False, chunk_bytes=chunk_bytes)
        self._records: dict[str, tuple[torch.Size, torch.dtype, torch.device]] = {}
        self._prefetched: dict[str, torch.Tensor] = {}
        self._arenas = {source: Arena(MetaChunkSource(source == "native"), chunk_bytes, None)
                        for source in ("native", "fallback")}
        self._slots: dict[str, dict[str, Slot]] = {}

    @property
    def arena_bytes(self) -> int:
        """The arena's chunks with the native extension; they only grow (the bank gives them back on `trim`)."""
        return self._arenas["native"].reserved

    @property
    def torch_arena_bytes(self) -> int:
        """The same without the extension: plain PyTorch's pinned chunks, each a power of two."""
        return self._arenas["fallback"].reserved

    @property
    def bytes_held(self) -> int:
        return sum(shape.numel() * dtype.itemsize for shape, dtype, _ in self._records.values())

    @property
    def prefetched_bytes(self) -> int:
        return sum(t.nbytes for t in self._prefetched.values())

    def __contains__(self, name: str) -> bool:
        return name in self._records

    def __len__(self) -> int:
        return len(self._records)

    def __iter__(self):
        return iter(list(self._records))

    def reserve(self, size) -> None:
        pass

    def offload(self, name: str, tensor: torch.Tensor, **_) -> None:
        self.discard(name)
        self._records[name] = (tensor.shape, tensor.dtype, tensor.device)
        if tensor.numel():
            self._slots[name] = {source: arena.alloc(tensor.nbytes) for source, arena in self._arenas.items()}

    def prefetch(self, name: str, device=None) -> None:
        if name not in self._prefetched:
            self._prefetched[name] = self._empty(name, device)

    def restore(self, name: str, device=None, non_blocking: bool = True) -> torch.Tensor:
        out = self._prefetched.pop(name, None)
        if out is None or (device is not None and out.device != torch.device(device)):
            out = self._empty(name, device)
        del self._records[name]
        self._free_slots(name)
        return out

    def read(self, name: str) -> torch.Tensor:
        shape, dtype, _ = self._records[name]
        return torch.empty(shape, dtype=dtype, device="meta")

    def discard(self, name: str) -> None:
        self._records.pop(name, None)
        self._prefetched.pop(name, None)
        self._free_slots(name)

    def _free_slots(self, name: str) -> None:
        for source, slot in self._slots.pop(name, {}).items():
            self._arenas[source].free(slot)

    def _empty(self, name: str, device) -> torch.Tensor:
        shape, dtype, home = self._records[name]
        return torch.empty(shape, dtype=dtype, device=home if device is None else device)


def make_state_bank(device: torch.device) -> HostStateBank:
    """SizeOnlyStateBank on meta; the real bank (pure-PyTorch arena, unpinned) with real tensors."""
    return SizeOnlyStateBank() if device.type == "meta" else HostStateBank(backend="fallback", pin=False)


# ----------------------------------------------------------------------------------------------------------------
# The schedule


def meta_gradient(model, p: torch.Tensor, tokens: int) -> torch.Tensor:
    """On meta, the gradient backward leaves on `p`: dense like `p`, or for an input embedding with `sparse=True`
    a COO gradient with one row per token of the step (uncoalesced, as nn.Embedding gives it)."""
    embedding = model.get_input_embeddings()
    if getattr(embedding, "sparse", False) and p is embedding.weight:
        indices = torch.empty(1, tokens, dtype=torch.int64, device="meta")
        values = torch.empty(tokens, *p.shape[1:], dtype=p.dtype, device="meta")
        # Marked coalesced so that coalesce() on meta (which has no kernel for it) returns it as it is.
        return torch.sparse_coo_tensor(indices, values, p.shape, is_coalesced=True, check_invariants=False)
    return torch.empty_like(p)


def make_gradients(model, device: torch.device, batch: torch.Tensor) -> None:
    """What backward leaves: on meta, an empty gradient per parameter that requires one; else a real backward."""
    if device.type == "meta":
        for p in model.parameters():
            if p.requires_grad:
                p.grad = meta_gradient(model, p, batch.shape[1])
        return
    model(input_ids=batch, labels=batch).loss.backward()


def step_in_backward(model, optimizer, device: torch.device, batch: torch.Tensor | None, measure) -> dict:
    """The step inside backward; returns `measure()` where it is largest: when a gradient has just arrived. On meta,
    each trainable parameter in turn (backward order) gets its gradient, is measured, stepped with
    `step_param` and freed; else a real backward under StepInBackward, measured by hooks that run before its own."""
    from lisa_kernels import StepInBackward

    trainable = [p for p in model.parameters() if p.requires_grad]
    seen = []
    if device.type == "meta":
        for p in reversed(trainable):
            p.grad = meta_gradient(model, p, batch.shape[1])
            seen.append(measure())
            optimizer.step_param(p)
            p.grad = None
    else:
        hooks = [p.register_post_accumulate_grad_hook(lambda _p: seen.append(measure())) for p in trainable]
        with StepInBackward(optimizer):
            model(input_ids=batch, labels=batch).loss.backward()
        for hook in hooks:
            hook.remove()
    return max(seen, key=lambda now: sum(now.values()))


def bench_args(shape: str, variant: Variant, args) -> SimpleNamespace:
    """The arguments bench_finetune.setup_method reads ("all" offloaded frozen layers: the shape's layer count)."""
    lisa_config = {"sparse_embedding_state": False, "sparse_embedding_grad": False,
                   **variant.settings.get("lisa_config", {})}
    if lisa_config.get("offload_frozen_layers") == "all":
        lisa_config["offload_frozen_layers"] = SHAPES[shape]["config"]["num_hidden_layers"]
    return SimpleNamespace(**{
        "lr": 1e-4, "weight_decay": 0.0, "lora_rank": args.lora_rank or SHAPES[shape]["lora_rank"],
        "n_active": args.n_active, "interval": args.interval, "seed": args.seed, "prefetch_steps": 1,
        "track_update_norms": False, "steps": args.periods * args.interval, **variant.settings,
        # Offloaded frozen layers need it (LisaTrainer's rule): their weights leave the device after their forward.
        "gradient_checkpointing": bool(lisa_config.get("offload_frozen_layers")),
        # Dense embedding state unless the variant asks for row-sparse state, so each saving is listed on its own.
        "lisa_config": lisa_config})


def touched_row_count(shape: str, args) -> int:
    return math.ceil(args.touched_rows * SHAPES[shape]["config"]["vocab_size"])


@contextlib.contextmanager
def assumed_touched_rows(count: int):
    """On meta, row-sparse embedding state gets `count` rows at its first step and none later (see the module
    docstring), and a sparse gradient's rows for them are made up in shape only; real tensors run the package's
    own code."""
    originals = {name: getattr(sparse_rows, name) for name in ("touched_rows", "add_rows", "_sparse_grad_rows")}

    def touched_rows(grad):
        if grad.device.type != "meta":
            return originals["touched_rows"](grad)
        return torch.empty(count, dtype=torch.int64, device="meta")

    def add_rows(state, rows):
        if rows.device.type != "meta":
            return originals["add_rows"](state, rows)
        if state[sparse_rows.ROWS].numel() == 0:
            for key, value in list(state.items()):
                if key != "step":
                    state[key] = value.new_empty((rows.numel(), *value.shape[1:]))

    def sparse_grad_rows(grad, rows):
        if grad.device.type != "meta":
            return originals["_sparse_grad_rows"](grad, rows)
        return grad.values().new_empty((rows.numel(), *grad.shape[1:]))

    patched = {"touched_rows": touched_rows, "add_rows": add_rows, "_sparse_grad_rows": sparse_grad_rows}
    for name, fn in patched.items():
        setattr(sparse_rows, name, fn)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(sparse_rows, name, fn)


def staging_bytes(offload) -> int:
    """What offloaded frozen layers hold on the device while they compute: the computing layer and the prefetched
    next one (`lisa_trainer.frozen_weights`), counted at the largest offloaded layer."""
    if offload is None or not offload.offloaded:
        return 0
    return 2 * max(sum(p.nbytes for p in offload.host_copies(i)) for i in offload.offloaded)


def account(shape: str, variant: Variant, device: torch.device, args, world: int | None = None,
            rank: int = 0) -> dict:
    """Run `args.periods` periods of `variant` on `shape`; bytes on the device (and parked on the host) per period.
    With `world`, on meta only: the model sharded with FSDP2 over `world` ranks of a fake process group, counted on
    `rank` (see "Sharded over ranks" in the module docstring)."""
    if world is None:
        return _account(shape, variant, device, args, None)
    if device.type != "meta":
        raise ValueError(f"account(world={world}): the sharded accounting runs on meta only, got {device}")
    with fake_world(world, rank):
        return _account(shape, variant, device, args, world)


def _account(shape: str, variant: Variant, device: torch.device, args, world: int | None) -> dict:
    setup = bench_args(shape, variant, args)
    setup.fsdp = world is not None
    model = build_model(shape, device, DTYPE, args.seed)
    kwargs = dict(variant.optimizer)
    bank = None
    if variant.method == "lisa-park":
        bank = kwargs["state_bank"] = make_state_bank(device)
    if world is not None and variant.method != "lora":
        shard(model, device)  # as the trainer does: before the optimizer sees the parameters
    model, optimizer, controller, memory = setup_method(variant.method, model, setup, device, **kwargs)
    if world is not None and variant.method == "lora":
        # peft wraps the layers first (its adapters are sharded with them); the optimizer then takes the shards.
        shard(model, device)
        optimizer = torch_adamw([p for p in model.parameters() if p.requires_grad], setup, device)
    # Tokens 0..n-1, then token 0 again: every position but the last has a next-token label, so exactly n rows of
    # the input embedding get a gradient, the count the meta run assumes (on meta only the shape is used).
    n = touched_row_count(shape, args)
    batch = torch.cat([torch.arange(n), torch.zeros(1, dtype=torch.int64)])[None].to(device)

    per_period = {key: [] for key in (*STATE_KEYS, "host", "layers_sampled")}
    peak, sampled = None, set()
    with assumed_touched_rows(touched_row_count(shape, args)):
        for period in range(1 if variant.method in STATIC_METHODS else args.periods):
            first = period * args.interval
            for step in sorted({first, first + args.interval - 1}):
                if controller is not None:
                    controller.on_step_begin(step)
                    sampled.update(controller.active_layers)
                offload = memory.offload if memory is not None else None

                def measure():
                    now = device_state_breakdown(model, optimizer, device)
                    if offload is not None:  # an offloaded layer computing now is in offload_staging
                        now["params"] -= offload.staged_bytes()
                    now["prefetched"] = bank.prefetched_bytes if isinstance(bank, SizeOnlyStateBank) else 0
                    now["offload_staging"] = staging_bytes(offload)
                    return now

                if variant.settings.get("optimizer_in_backward"):
                    now = step_in_backward(model, optimizer, device, batch, measure)
                else:
                    make_gradients(model, device, batch)
                    optimizer.step()
                    now = measure()
                if memory is not None:
                    memory.after_backward()
                if peak is None or sum(now.values()) > sum(peak.values()):
                    peak = now
                optimizer.zero_grad(set_to_none=True)
                if controller is not None:
                    controller.on_step_end(step)
            for key in STATE_KEYS:
                per_period[key].append(now[key])
            per_period["host"].append(bank.bytes_held if bank is not None else 0)
            per_period["layers_sampled"].append(len(sampled))

    result = {
        "variant_method": variant.method,
        "optimizer": {k: str(v).removeprefix("torch.") for k, v in variant.optimizer.items()},
        "settings": dict(variant.settings),
        "note": variant.note,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "per_period": per_period,
        "peak": {**peak, "device_state": sum(peak.values())},
    }
    if isinstance(bank, SizeOnlyStateBank):
        result["host_pinned"] = {"native": bank.arena_bytes, "torch": bank.torch_arena_bytes}
    if world is not None:
        result["fsdp"] = fsdp_figures(model, world)
    elif device.type == "meta":
        if memory is not None:  # weights are not activations: every layer's weights in place, the model as built
            memory.release_model()
        result["activations"] = activation_bytes(model, shape, args)
    return result


# ----------------------------------------------------------------------------------------------------------------
# Variants without a sharded form


def unsharded_only(variant: Variant) -> str | None:
    """Why `variant` has no FSDP form (MemoryFeatures' rules), or None."""
    lisa = variant.settings.get("lisa_config", {})
    if variant.settings.get("optimizer_in_backward"):
        return "the optimizer step inside backward runs in one process"
    if lisa.get("offload_frozen_layers"):
        return "frozen-layer weight offload runs in one process"
    if lisa.get("sparse_embedding_state"):
        return "under FSDP the embedding's moments are sharded dense (row-sparse state is off)"
    return None


# ----------------------------------------------------------------------------------------------------------------
# Activations


def _flash_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention through the flash-attention op, which has a meta implementation (SDPA on meta would
    take the math path and save a seq x seq matrix that the GPU never holds)."""
    repeat = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(repeat, dim=1), value.repeat_interleave(repeat, dim=1)
    out = torch.ops.aten._scaled_dot_product_flash_attention(query, key, value, dropout, True, False, scale=scaling)[0]
    return out.transpose(1, 2).contiguous(), None


_ATTENTION = "lisa_meta_sdpa"  # a name with "flash" in it would make transformers look for a hub kernel


def _register_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_ATTENTION, _flash_attention)


def saved_tensors(fn, exclude: set) -> list[torch.Tensor]:
    """The tensors autograd saves while `fn()` runs, one per storage, leaving out storages in `exclude`."""
    seen = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage._cdata not in exclude and storage._cdata not in seen:
            seen[storage._cdata] = t
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return list(seen.values())


def _nbytes(tensors) -> int:
    return sum(t.untyped_storage().nbytes() for t in tensors)


def activation_bytes(model, shape: str, args) -> dict:
    """The activation terms of the module docstring, in bytes, for this model as the method left it (frozen
    layers save less than trained ones; LoRA adapters save their inputs)."""
    from lisa_trainer.layers import find_decoder_layers

    _register_attention()
    cfg = SHAPES[shape]["config"]
    b, s, h, vocab = args.batch_size, args.seq_len, cfg["hidden_size"], cfg["vocab_size"]
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    params = {p.untyped_storage()._cdata for p in model.parameters()}
    _, layers = find_decoder_layers(model)
    x = torch.empty(b, s, h, dtype=DTYPE, device="meta", requires_grad=True)
    position_ids = torch.arange(s, device="meta")[None]
    position_embeddings = lm.model.rotary_emb(x, position_ids)

    config, previous = lm.config, lm.config._attn_implementation
    config._attn_implementation = _ATTENTION
    try:
        layer_bytes = {}
        for layer in layers:  # layers frozen alike save alike: measure each pattern of requires_grad once
            pattern = tuple(p.requires_grad for p in layer.parameters())
            if pattern not in layer_bytes:
                layer_bytes[pattern] = _nbytes(saved_tensors(
                    lambda: layer(x, attention_mask=None, position_ids=position_ids,
                                  position_embeddings=position_embeddings), params))
    finally:
        config._attn_implementation = previous
    labels = torch.zeros(b, s, dtype=torch.long, device="meta")
    head = saved_tensors(lambda: lm.loss_function(lm.get_output_embeddings()(lm.model.norm(x)), labels,
                                                  vocab_size=vocab), params)
    vocab_wide = _nbytes(t for t in head if t.dim() and t.shape[-1] == vocab)
    other = _nbytes(head) - vocab_wide
    out = {
        "checkpoints": len(layers) * b * s * h * DTYPE.itemsize,
        "layer": max(layer_bytes.values()),
        "head": other + 3 * vocab_wide,
        "head_chunked": other + 3 * vocab_wide * min(args.loss_chunk, b * s) // (b * s),
    }
    out["total"] = out["checkpoints"] + max(out["layer"], out["head"])
    out["total_chunked_loss"] = out["checkpoints"] + max(out["layer"], out["head_chunked"])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Comparisons, table, chart


def totals(r: dict) -> tuple[float, float]:
    """(total, total with the chunked loss) in bytes: peak device state + activations."""
    a = r["activations"]
    return r["peak"]["device_state"] + a["total"], r["peak"]["device_state"] + a["total_chunked_loss"]


def compare(results: dict, target_bytes: float) -> dict:
    """The package's memory targets, judged on the totals without the chunked loss: park at or below LoRA and at most
    45% of full fine-tuning. Then what each saving brings on its own against plain `lisa-park` (every other park
    variant, and the chunked loss), and the leanest park variant with the chunked loss against `target_bytes`, and
    against LoRA and full fine-tuning with the chunked loss too."""
    t = {name: totals(r) for name, r in results.items()}
    park = [n for n in t if VARIANTS[n].method == "lisa-park"]
    out = {}
    for name in park:
        mine = t[name][0]
        if "lora" in t:
            out[f"{name}_vs_lora"] = mine / t["lora"][0]
            out[f"{name}_at_or_below_lora"] = mine <= t["lora"][0]
        if "full" in t:
            out[f"{name}_vs_full"] = mine / t["full"][0]
            out[f"{name}_at_most_45pct_of_full"] = mine <= 0.45 * t["full"][0]
    if "lisa-park" in t:
        base = t["lisa-park"][0]
        out["savings_vs_lisa_park_bytes"] = {"chunked_loss": base - t["lisa-park"][1],
                                             **{n: base - t[n][0] for n in park if n != "lisa-park"}}
    if park:  # with the chunked loss, against LoRA and full fine-tuning with the chunked loss too
        lean = min(park, key=lambda n: t[n][1])
        out["leanest"] = {"variant": lean, "chunked_loss": True, "total_bytes": t[lean][1],
                          "within_target": t[lean][1] <= target_bytes}
        for ref in ("lora", "full"):
            if ref in t:
                out["leanest"][f"vs_{ref}"] = t[lean][1] / t[ref][1]
    return out


def rows_for(shape: str, results: dict) -> list[dict]:
    full = totals(results["full"])[0] if "full" in results else None
    lora = totals(results["lora"])[0] if "lora" in results else None
    rows = []
    for name, r in results.items():
        total, chunked = totals(r)
        peak, last = r["peak"], {k: v[-1] for k, v in r["per_period"].items()}
        rows.append({
            "shape": shape, "variant": name,
            "params_gb": peak["params"] / GB, "grads_gb": peak["grads"] / GB,
            "opt_state_gb": peak["optimizer_state"] / GB, "prefetch_gb": peak["prefetched"] / GB,
            "offload_staging_gb": peak["offload_staging"] / GB,
            "resident_first_gb": sum(r["per_period"][k][0] for k in RESIDENT_KEYS) / GB,
            "resident_last_gb": sum(last[k] for k in RESIDENT_KEYS) / GB,
            "host_gb": last["host"] / GB,
            "activations_gb": r["activations"]["total"] / GB, "total_gb": total / GB,
            "total_chunked_gb": chunked / GB,
            "vs_full": total / full if full else None, "vs_lora": total / lora if lora else None,
        })
    return rows


def fsdp_rows(shape: str, world: int, results: dict, unsharded: dict, ranks_per_node: int) -> list[dict]:
    """One row per variant sharded over `world` ranks: a rank's device bytes (its peak state, FSDP2's gathered
    weights and whole gradients, the activations of its own micro-batch, which sharding does not change: those of
    the unsharded run) and a node's host bytes (its ranks' parked moments, and the pinned arena holding them)."""
    node = min(world, ranks_per_node)
    full = results.get("full")
    rows = []
    for name, r in results.items():
        peak, fsdp = r["peak"], r["fsdp"]
        activations = unsharded[name]["activations"]["total"]
        total = peak["device_state"] + fsdp["total"] + activations
        pinned = r.get("host_pinned", {"native": 0, "torch": 0})
        rows.append({
            "shape": shape, "ranks": world, "variant": name,
            "params_gb": peak["params"] / GB, "grads_gb": peak["grads"] / GB,
            "opt_state_gb": peak["optimizer_state"] / GB, "prefetch_gb": peak["prefetched"] / GB,
            "gathered_gb": fsdp["total"] / GB, "activations_gb": activations / GB, "total_gb": total / GB,
            "host_rank_gb": r["per_period"]["host"][-1] / GB, "host_node_gb": node * r["per_period"]["host"][-1] / GB,
            "pinned_node_gb": node * pinned["native"] / GB, "pinned_node_torch_gb": node * pinned["torch"] / GB,
            "vs_full": total / (full["peak"]["device_state"] + full["fsdp"]["total"]
                                + unsharded["full"]["activations"]["total"]) if full else None,
        })
    return rows


def plot(payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shapes = list(payload["results"])
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4.5), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for name, r in payload["results"][shape].items():
            per = r["per_period"]
            state = [sum(per[k][i] for k in RESIDENT_KEYS) / GB for i in range(len(per["params"]))]
            if VARIANTS[name].method in STATIC_METHODS:
                ax.axhline(state[-1], label=name, linestyle="--", color="gray" if name == "full" else "black")
            else:
                ax.plot(range(len(state)), state, label=name)
        ax.set_title(f"{shape}: params + grads + optimizer state resident on the device", fontsize=9)
        ax.set_xlabel("period")
        ax.set_ylabel("GB (10^9 bytes)")
        ax.legend(fontsize=7)
    c = payload["config"]
    fig.suptitle(f"bench_memory on meta: {c['periods']} periods, γ={c['n_active']} (no activations, no prefetch)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shapes", default="7b,8b,70b", help=f"comma-separated subset of {','.join(SHAPES)}")
    p.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated subset of " + ",".join(VARIANTS))
    p.add_argument("--periods", type=int, default=100)
    p.add_argument("--n-active", type=int, default=2, help="LISA γ: middle layers trained per period")
    p.add_argument("--interval", type=int, default=20, help="LISA K: steps per period")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lora-rank", type=int, default=None, help="default: the shape's (128; 8 on the tiny shape)")
    p.add_argument("--seq-len", type=int, default=1024, help="for the activation estimate")
    p.add_argument("--batch-size", type=int, default=1, help="for the activation estimate")
    p.add_argument("--loss-chunk", type=int, default=256, help="tokens per chunk of a chunked LM-head loss")
    p.add_argument("--touched-rows", type=float, default=0.05,
                   help="fraction of the vocabulary whose embedding rows get a gradient (row-sparse state; assumed)")
    p.add_argument("--target-gb", type=float, default=20.0, help="the budget the lean LISA total is judged against")
    p.add_argument("--fsdp-ranks", default="", help="also shard each variant with FSDP2 over these numbers of ranks "
                   "(comma-separated, e.g. 8,16,64): per-rank device bytes and per-node host bytes")
    p.add_argument("--ranks-per-node", type=int, default=8, help="ranks (GPUs) per node, for the host bytes per node")
    p.add_argument("--name", default="memory", help="results name")
    p.add_argument("--results-dir", default=None, help="default: $LISA_BENCH_RESULTS, else benchmarks/results")
    p.add_argument("--no-plot", action="store_true")
    args = p.parse_args(argv)
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    args.variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    for flag, chosen, known in (("--shapes", args.shapes, SHAPES), ("--variants", args.variants, VARIANTS)):
        unknown = [c for c in chosen if c not in known]
        if unknown or not chosen:
            p.error(f"{flag}: unknown or empty {unknown}; choose from {', '.join(known)}")
    for flag in ("periods", "n_active", "interval", "seq_len", "batch_size", "loss_chunk"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag.replace('_', '-')} must be >= 1")
    if not 0 < args.touched_rows <= 1:
        p.error(f"--touched-rows must be in (0, 1], got {args.touched_rows}")
    try:
        args.fsdp_ranks = [int(n) for n in args.fsdp_ranks.split(",") if n.strip()]
    except ValueError:
        p.error(f"--fsdp-ranks: comma-separated numbers of ranks, got {args.fsdp_ranks!r}")
    if any(n < 2 for n in args.fsdp_ranks):
        p.error(f"--fsdp-ranks: each number of ranks must be >= 2, got {args.fsdp_ranks}")
    if args.ranks_per_node < 1:
        p.error("--ranks-per-node must be >= 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device("meta")
    results, rows, comparisons = {}, [], {}
    sharded, fsdp_table = {}, []
    shardable = [name for name in args.variants if unsharded_only(VARIANTS[name]) is None] if args.fsdp_ranks else []
    for shape in args.shapes:
        results[shape] = {}
        for name in args.variants:
            t0 = time.monotonic()
            results[shape][name] = account(shape, VARIANTS[name], device, args)
            print(f"[bench_memory] {shape} {name}: {time.monotonic() - t0:.1f} s", flush=True)
        comparisons[shape] = compare(results[shape], args.target_gb * GB)
        rows += rows_for(shape, results[shape])
        sharded[shape] = {}
        for world in args.fsdp_ranks:
            sharded[shape][world] = {}
            for name in shardable:
                t0 = time.monotonic()
                sharded[shape][world][name] = account(shape, VARIANTS[name], device, args, world=world)
                print(f"[bench_memory] {shape} {name} FSDP2 over {world} ranks: {time.monotonic() - t0:.1f} s",
                      flush=True)
            fsdp_table += fsdp_rows(shape, world, sharded[shape][world], results[shape], args.ranks_per_node)

    payload = {
        "benchmark": "memory",
        "what": "accounting of the allocations made by the package's real code on the meta device, not a GPU "
                "measurement; activations estimated as the module docstring states",
        "config": dict(periods=args.periods, n_active=args.n_active, interval=args.interval, seed=args.seed,
                       seq_len=args.seq_len, batch_size=args.batch_size, loss_chunk=args.loss_chunk,
                       touched_rows=args.touched_rows,
                       dtype=str(DTYPE).removeprefix("torch."), gradient_checkpointing=True,
                       target_gb=args.target_gb, gb=GB,
                       shapes={s: SHAPES[s]["config"] for s in args.shapes},
                       lora_rank={s: args.lora_rank or SHAPES[s]["lora_rank"] for s in args.shapes}),
        "environment": environment(device),
        "paper": {s: PAPER[s] for s in args.shapes if s in PAPER},
        "comparisons": comparisons,
        "table": rows,
        "results": results,
    }
    if args.fsdp_ranks:
        payload["fsdp"] = {
            "what": "FSDP2 (one unit per decoder layer plus the root) over a fake process group: rank 0's shards "
                    "counted through the package's code; gathered weights and whole gradients derived from the "
                    "shards (fsdp_figures); activations of one rank's micro-batch, as unsharded",
            "ranks": args.fsdp_ranks, "ranks_per_node": args.ranks_per_node, "rank": 0,
            "not_sharded": {name: unsharded_only(VARIANTS[name]) for name in args.variants
                            if name not in shardable},
            "table": fsdp_table,
            "results": sharded,
        }
    print_table(rows, title=f"\nbytes on the device ({args.periods} periods, γ={args.n_active}; activations for "
                            f"seq {args.seq_len} x batch {args.batch_size}, gradient checkpointing; GB = 1e9 B)")
    for shape, c in comparisons.items():
        print(f"{shape}: {c}")
    if fsdp_table:
        print_table(fsdp_table, title=f"\nFSDP2, per rank (device) and per node of {args.ranks_per_node} ranks "
                                      f"(host; pinned: the arena, native extension / plain PyTorch); GB = 1e9 B")
    save_results(args.name, payload, device, args.results_dir,
                 chart=None if args.no_plot else lambda png: plot(payload, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
