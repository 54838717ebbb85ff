"""End to end: full fine-tuning, LoRA and LISA side by side on one Llama-architecture model.

Every method trains a fresh model built from the same config and seed (random weights, real shapes) on the same
synthetic token batches, and reports peak GPU memory (allocated / reserved), the training state it keeps on the
device (parameters + gradients + optimizer state, measured after each optimizer step), median step time, tokens/s,
the stall at a LISA switch (median of switch steps minus median of the other steps) and the loss after N steps.

Methods:
  full         full fine-tuning, torch.optim.AdamW (fused=True on CUDA, foreach on CPU)
  lora         peft LoRA, rank 128 on all linear layers, torch AdamW over the adapters
  lisa-park    ours: lisa_trainer.build_optimizer (FusedAdamW) + LisaController, frozen layers' state parked on host
  lisa-park-torch  the same with torch.optim.AdamW (fused=True on CUDA) and the generic StateParker
  lisa-reset   ours, state dropped at every switch
  lisa-keep    ours, state kept on the device
  lisa-public  LISA as LMFlow / Axolotl ship it: requires_grad toggled every K steps, a plain torch AdamW over all
               parameters whose state for every layer ever sampled stays on the device
  trainer-lisa  Hugging Face Trainer + LisaCallback (optimizer_for, park): under --nproc the callback all-reduces
               the trainable set only, with no flag
  trainer-lisa-find-unused  the same with LisaCallback(gradient_sync="ddp") and ddp_find_unused_parameters=True:
               the Trainer's DDP all-reduces the whole model every step, as LISA callbacks usually run

By default each method runs in its own process on a GPU (so one method's peak or OOM cannot pollute the next) and
in this process on CPU (where importing torch + transformers costs more than the tiny run itself).

    python -m benchmarks.bench_finetune                        # tiny model, CPU or GPU
    python -m benchmarks.bench_finetune --shape 1b             # Llama-3.2-1B-like
    python -m benchmarks.bench_finetune --shape 7b --methods lisa-park,lora,full
    python -m benchmarks.bench_finetune --nproc 8 --shape 7b --methods full,lora,lisa-park   # DDP on 8 GPUs
    python -m benchmarks.bench_finetune --nproc 8 --fsdp --shape 7b --methods full,lisa-park  # FSDP2 on 8 GPUs
    python -m benchmarks.bench_finetune --nproc 8 --shape 7b --methods trainer-lisa,trainer-lisa-find-unused

One benchmark, one script (~730 lines): its methods, runs, isolation and report are read and changed together;
what other benchmarks share is in `benchmarks.common` and `benchmarks.data_parallel`.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

from benchmarks.common import environment, print_table, save_results, summarize, synchronize
from benchmarks.data_parallel import BenchDataParallel, TrainerReport, launcher, rank, worker_argv, world_size

METHODS = ("full", "lora", "lisa-park", "lisa-park-torch", "lisa-reset", "lisa-keep", "lisa-public", "trainer-lisa",
           "trainer-lisa-find-unused")
GB = 1e9

# Llama configs. "1b" follows Llama-3.2-1B (GQA, tied embeddings, 128k vocab), "7b" Llama-2-7B, "8b" Llama-3-8B
# (GQA, untied 128k embedding and head), "70b" Llama-2-70B (GQA); bench_memory.py accounts all of them on `meta`.
# LoRA rank 128 is the paper's comparison at 7B (1/32 of the hidden size); on the tiny model rank 128 would equal
# the hidden size and give adapters larger than the layers, so it uses rank 8 there.
SHAPES = {
    "tiny": dict(
        config=dict(vocab_size=1024, hidden_size=128, intermediate_size=352, num_hidden_layers=8,
                    num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False),
        seq_len=64, batch_size=4, steps=45, lora_rank=8),
    "1b": dict(
        config=dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=True, rope_theta=500000.0),
        seq_len=1024, batch_size=4, steps=60, lora_rank=128),
    "7b": dict(
        config=dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=32, tie_word_embeddings=False),
        seq_len=1024, batch_size=2, steps=45, lora_rank=128),
    "8b": dict(
        config=dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                    num_attention_heads=32, num_key_value_heads=8, tie_word_embeddings=False, rope_theta=500000.0),
        seq_len=1024, batch_size=1, steps=45, lora_rank=128),
    "70b": dict(
        config=dict(vocab_size=32000, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                    num_attention_heads=64, num_key_value_heads=8, tie_word_embeddings=False),
        seq_len=1024, batch_size=1, steps=45, lora_rank=128),
}


# ----------------------------------------------------------------------------------------------------------------
# Model, data, methods


def build_model(shape: str, device: torch.device, dtype: torch.dtype, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**SHAPES[shape]["config"], max_position_embeddings=4096, use_cache=False)
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    # Built directly on the device in the training dtype: a 7B model built in fp32 first would need 27 GB more.
    old_dtype = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old_dtype)
    model.train()
    return model


def make_batches(vocab: int, batch_size: int, seq_len: int, n: int, seed: int) -> list[torch.Tensor]:
    """A few fixed batches cycled through: the loss falls as the model memorises them, so it tells methods apart."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (batch_size, seq_len), generator=g) for _ in range(n)]


class PublicLisa:
    """LISA as the public implementations do it: every K steps set requires_grad on γ sampled layers (plus embedding,
    head and final norm) and off on the rest. The optimizer is never told, so its state for every layer ever sampled
    stays on the device."""

    def __init__(self, model, n_active: int, interval: int, seed: int):
        self.layers = model.model.layers
        self.n_active, self.interval, self.seed = n_active, interval, seed
        self.always = [model.get_input_embeddings(), model.get_output_embeddings(), model.model.norm]
        try:  # the same layer sequence as ours when the core package is there, so losses are comparable
            from lisa_trainer import LayerSampler
            self._sampler = LayerSampler(len(self.layers), n_active, seed)
        except ImportError:
            self._sampler = None
        self.active_layers: tuple[int, ...] = ()

    def _layers_for_period(self, period: int) -> tuple[int, ...]:
        if self._sampler is not None:
            return tuple(self._sampler.layers_for_period(period))
        return tuple(sorted(random.Random(self.seed * 1_000_003 + period).sample(range(len(self.layers)),
                                                                                 self.n_active)))

    def on_step_begin(self, step: int) -> None:
        if step % self.interval:
            return
        self.active_layers = self._layers_for_period(step // self.interval)
        for i, layer in enumerate(self.layers):
            layer.requires_grad_(i in self.active_layers)
        for module in self.always:
            module.requires_grad_(True)

    def on_step_end(self, step: int) -> None:
        pass


def torch_adamw(params, args, device):
    kw = dict(fused=True) if device.type == "cuda" else dict(foreach=True)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay, **kw)


def setup_method(method: str, model, args, device, **lisa_optimizer_kwargs):
    """-> (model, optimizer, controller or None, our LISA methods' `lisa_trainer.memory.MemoryFeatures` or None).
    Raises ImportError when a method's package is missing. `lisa_optimizer_kwargs` go to our LISA methods'
    FusedAdamW (e.g. state_dtype, state_bank)."""
    if method == "full":
        return model, torch_adamw(model.parameters(), args, device), None, None
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, lora_dropout=0.0,
                          target_modules="all-linear", bias="none")
        model = get_peft_model(model, lora)
        params = [p for p in model.parameters() if p.requires_grad]
        return model, torch_adamw(params, args, device), None, None
    if method == "lisa-public":
        controller = PublicLisa(model, args.n_active, args.interval, args.seed)
        # Built over all parameters before anything is frozen, as those callbacks do.
        return model, torch_adamw(model.parameters(), args, device), controller, None
    if method.startswith("lisa-"):
        from lisa_trainer import LisaConfig, LisaController

        cfg = LisaConfig(n_active_layers=args.n_active, interval_steps=args.interval, seed=args.seed,
                         state_policy=method.removeprefix("lisa-").removesuffix("-torch"),
                         track_update_norms=args.track_update_norms, prefetch_steps=args.prefetch_steps,
                         **getattr(args, "lisa_config", {}))
        memory = None
        if method.endswith("-torch"):
            optimizer = torch_adamw(model.parameters(), args, device)
        else:  # the memory features as LisaTrainer decides them, for this run's processes
            from lisa_trainer.memory import MemoryFeatures

            memory = MemoryFeatures(model, cfg, lisa_training_arguments(args), processes=world_size(),
                                    fsdp=getattr(args, "fsdp", False), **lisa_optimizer_kwargs)
            cfg, optimizer = memory.config, memory.optimizer
            memory.take_model()
        controller = LisaController(model, optimizer, cfg)
        if memory is not None:
            memory.attach(controller)
        if cfg.state_policy == "park":
            # Create the bank now: it loads (on a fresh machine, compiles) the native host arena, a one-time cost
            # that is not a switch stall. `python -m lisa_kernels.build` does the compile ahead of time.
            # Likewise pin the host memory for the moments this run's switches will park: growing the arena
            # page-locks every new byte (cudaHostAlloc), a cost each layer pays once in a long run, but in a run
            # with one or two switches it would land in every switch step measured.
            sampler = controller.sampler
            switches = range(1, (args.steps - 1) // args.interval + 1)
            leaving = set().union(*(set(sampler.layers_for_period(p - 1)) - set(sampler.layers_for_period(p))
                                    for p in switches))
            moment_dtype = getattr(optimizer, "moment_dtype", lambda p: p.dtype)  # torch AdamW: the param's dtype
            controller.parker.bank.reserve([torch.empty(p.shape, dtype=moment_dtype(p), device="meta")
                                          for i in sorted(leaving) for p in controller.layer_parameters(i)
                                          for _moment in ("exp_avg", "exp_avg_sq")])
        return model, optimizer, controller, memory
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def lisa_training_arguments(args):
    """The `LisaTrainingArguments` our LISA methods' memory features are decided from: the benchmark's optimizer
    settings and gradient checkpointing. The loss is the benchmark's own (the same for every method) and its loop
    steps without clipping; LisaTrainingArguments needs an output folder, which this loop never writes to."""
    import tempfile

    from lisa_trainer import LisaTrainingArguments

    return LisaTrainingArguments(output_dir=tempfile.gettempdir(), learning_rate=args.lr,
                                 weight_decay=args.weight_decay, chunked_loss=False, max_grad_norm=0.0,
                                 gradient_checkpointing=getattr(args, "gradient_checkpointing", False))


def is_switch_step(method: str, step: int, interval: int) -> bool:
    return "lisa" in method and step > 0 and step % interval == 0


# ----------------------------------------------------------------------------------------------------------------
# One method


def _tensor_bytes(t) -> int:
    if not isinstance(t, torch.Tensor):
        return 0
    if t.is_sparse:  # a sparse COO gradient (nn.Embedding(sparse=True)): its indices and values
        return _tensor_bytes(t._indices()) + _tensor_bytes(t._values())
    t = t.to_local() if hasattr(t, "to_local") else t  # an FSDP shard: what this rank holds
    return t.numel() * t.element_size()


def device_state_breakdown(model, optimizer, device) -> dict:
    """Bytes of parameters, gradients and optimizer state that live on the training device right now (scalar `step`
    counters excluded). Deterministic and device-independent: the CPU (and meta) stand-in for the GPU peak."""
    seen, out = set(), {"params": 0, "grads": 0, "optimizer_state": 0}
    for p in model.parameters():
        if id(p) in seen:  # tied embeddings count once
            continue
        seen.add(id(p))
        if p.device == device:
            out["params"] += _tensor_bytes(p)
            if p.grad is not None:
                out["grads"] += _tensor_bytes(p.grad)
    for state in optimizer.state.values():
        for t in state.values():
            if isinstance(t, torch.Tensor) and t.device == device and t.dim() > 0:
                out["optimizer_state"] += _tensor_bytes(t)
    return out


def device_state_bytes(model, optimizer, device) -> int:
    return sum(device_state_breakdown(model, optimizer, device).values())


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class MethodUnavailable(Exception):
    """The package a method needs (peft, lisa_trainer) is not installed."""


@dataclasses.dataclass
class TrainingRun:
    """What one method's training leaves for its figures."""
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    model_params: int
    model_gb: float | None            # device memory of the bare model, right after it was built (GPU only)
    losses: list[float] = dataclasses.field(default_factory=list)
    step_times_ms: list[float] = dataclasses.field(default_factory=list)
    device_state_peak: int = 0        # bytes: the largest device_state_bytes after an optimizer step
    updated: set[int] = dataclasses.field(default_factory=set)  # ids of the parameters that ever had a gradient
    bank: object = None               # the HostStateBank of a method that parks
    data_parallel: object = None      # BenchDataParallel under torchrun (--nproc)
    comm_bytes: list[int] = dataclasses.field(default_factory=list)  # bytes communicated per step (data parallel)


def run_method(method: str, args, device: torch.device, dtype: torch.dtype, isolated: bool) -> dict:
    """Train one method on a fresh model: its figures, or a status saying why there are none."""
    # Resolved here, not in the driver: with one process per method the driver must not create a CUDA context
    # (~0.5 GB of GPU memory the workers would lose) until they are done. Parameters report cuda:0; cuda != cuda:0.
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cuda":
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        if args.memory_limit_gb:  # a smaller card: allocations beyond it fail as out of memory
            total = torch.cuda.get_device_properties(device).total_memory
            torch.cuda.set_per_process_memory_fraction(min(1.0, args.memory_limit_gb * GB / total), device)
    import_method_packages(method)  # before the RSS baseline: library code is not training memory
    rss0 = _rss_bytes() if isolated and device.type == "cpu" else None
    try:
        run = train(method, args, device, dtype)
    except MethodUnavailable as exc:
        return {"method": method, "status": f"unavailable: {exc}"}
    except Exception as exc:  # recorded as the method's result; the other methods still run
        result = failure(method, exc)
    else:
        result = {"method": method, "status": "ok", **run_figures(method, run, args, device)}
        del run
    result.update(peak_memory_figures(device, rss0))
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


def uses_lisa_trainer(method: str) -> bool:
    """Our LISA methods (lisa_trainer's controller), not the public implementations' style."""
    return method.startswith("lisa-") and method != "lisa-public"


def import_method_packages(method: str) -> None:
    from transformers import LlamaForCausalLM  # noqa: F401
    try:
        if method == "lora":
            import peft  # noqa: F401
        elif uses_lisa_trainer(method) or method.startswith("trainer-"):
            import lisa_kernels  # noqa: F401
            import lisa_trainer  # noqa: F401
    except ImportError:
        pass  # reported as "unavailable" by setup_method


def train(method: str, args, device: torch.device, dtype: torch.dtype) -> TrainingRun:
    """Build the model and the method's optimizer, then train `args.steps` steps, timing each whole step."""
    if method.startswith("trainer-"):
        return train_with_trainer(method, args, device, dtype)
    shape = SHAPES[args.shape]
    batches = [b.to(device) for b in make_batches(shape["config"]["vocab_size"], args.batch_size, args.seq_len,
                                                  args.n_batches, args.seed + rank())]  # each rank its own data
    model = build_model(args.shape, device, dtype, args.seed)
    if args.gradient_checkpointing:
        from lisa_trainer.layers import enable_gradient_checkpointing

        enable_gradient_checkpointing(model)
    model_params = sum(p.numel() for p in model.parameters())
    model_gb = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None
    try:
        # Under torchrun (--nproc): data parallel, with the bytes communicated counted.
        dp = BenchDataParallel(method, model, device, args.fsdp) if world_size() > 1 else None
        model, optimizer, controller, memory = setup_method(method, model, args, device)
    except ImportError as exc:
        raise MethodUnavailable(exc) from exc
    if dp is not None:
        model = dp.wrap(model, controller)
    chunked = None
    if args.chunked_loss:
        from lisa_trainer.loss import ChunkedCausalLMLoss

        chunked = ChunkedCausalLMLoss(model)
    bank = controller.parker.bank if method.startswith("lisa-park") else None
    run = TrainingRun(model, optimizer, model_params, model_gb, bank=bank, data_parallel=dp)
    for step in range(args.steps):
        batch = batches[step % len(batches)]
        synchronize(device)
        # Wall clock around the whole step, controller hooks included: a switch that blocks on host copies
        # must show up in the step time, and per-step synchronize costs nothing next to a training step.
        t0 = time.perf_counter()
        if controller is not None:
            controller.on_step_begin(step)
        loss = step_loss(model, batch, chunked)
        if dp is None:
            loss.backward()
        else:
            run.comm_bytes.append(dp.backward(loss))
        if memory is not None:
            memory.after_backward()
        optimizer.step()
        run.device_state_peak = max(run.device_state_peak, device_state_bytes(model, optimizer, device))
        run.updated.update(id(p) for p in model.parameters() if p.grad is not None)
        optimizer.zero_grad(set_to_none=True)
        if controller is not None:
            controller.on_step_end(step)
        run.losses.append(loss.item())
        synchronize(device)
        run.step_times_ms.append((time.perf_counter() - t0) * 1e3)
    return run


def train_with_trainer(method: str, args, device: torch.device, dtype: torch.dtype) -> TrainingRun:
    """The callback path: Hugging Face `Trainer` + `LisaCallback` (FusedAdamW from `optimizer_for`, `park`) on the
    same model and batches, the Trainer's own loop and, under torchrun, its own DDP wrapper."""
    try:
        from transformers import Trainer, TrainerCallback, TrainingArguments

        from lisa_trainer import LisaCallback, LisaConfig
    except ImportError as exc:
        raise MethodUnavailable(exc) from exc
    shape = SHAPES[args.shape]
    # The batches of every rank (its own seed, as the other methods' ranks), laid out so that the Trainer's
    # sequential order gives rank r its k-th batch at step k.
    per_rank = [make_batches(shape["config"]["vocab_size"], args.batch_size, args.seq_len, args.n_batches,
                             args.seed + r) for r in range(world_size())]
    rows = [row for k in range(args.n_batches) for batches in per_rank for row in batches[k]]
    model = build_model(args.shape, device, dtype, args.seed)
    model_params = sum(p.numel() for p in model.parameters())
    model_gb = torch.cuda.memory_allocated(device) / GB if device.type == "cuda" else None
    whole_model = method == "trainer-lisa-find-unused"
    cfg = LisaConfig(n_active_layers=args.n_active, interval_steps=args.interval, seed=args.seed,
                     track_update_norms=args.track_update_norms, prefetch_steps=args.prefetch_steps)
    run = None

    class Clock(TrainerCallback):
        """Wall clock around each whole optimizer step, as the other methods are timed."""

        def on_step_begin(self, *a, **kw):
            synchronize(device)
            self.t0 = time.perf_counter()

        def on_pre_optimizer_step(self, *a, **kw):
            run.updated.update(id(p) for p in model.parameters() if p.grad is not None)

        def on_step_end(self, *a, **kw):
            synchronize(device)
            run.step_times_ms.append((time.perf_counter() - self.t0) * 1e3)
            run.device_state_peak = max(run.device_state_peak, device_state_bytes(model, run.optimizer, device))

    with tempfile.TemporaryDirectory() as out:
        targs = TrainingArguments(
            output_dir=out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
            learning_rate=args.lr, weight_decay=args.weight_decay, lr_scheduler_type="constant", max_grad_norm=0.0,
            logging_steps=1, report_to=[], save_strategy="no", disable_tqdm=True, dataloader_num_workers=0,
            use_cpu=device.type == "cpu", seed=args.seed, gradient_checkpointing=args.gradient_checkpointing,
            # transformers 5 (earlier ones shuffle: the losses stay comparable, not equal)
            **({"train_sampling_strategy": "sequential"}
               if "train_sampling_strategy" in TrainingArguments.__dataclass_fields__ else {}),
            ddp_find_unused_parameters=True if whole_model else None)
        optimizer = LisaCallback.optimizer_for(model, targs, cfg)
        run = TrainingRun(model, optimizer, model_params, model_gb,
                          data_parallel=TrainerReport("all-reduce (DDP, find_unused_parameters, whole model)"
                                                      if whole_model else "all-reduce (LisaCallback, active set)")
                          if world_size() > 1 else None)
        lisa = LisaCallback(cfg, gradient_sync="ddp" if whole_model else "active")
        trainer = Trainer(model=model, args=targs, train_dataset=[{"input_ids": r, "labels": r} for r in rows],
                          callbacks=[lisa, Clock()], optimizers=(optimizer, None))
        trainer.train()
    logged = [h for h in trainer.state.log_history if "loss" in h]
    run.losses = [h["loss"] for h in logged]
    run.comm_bytes = [int(h["lisa/allreduce_bytes"]) for h in logged if "lisa/allreduce_bytes" in h]
    run.bank = lisa.controller.parker.bank
    return run


def step_loss(model, batch: torch.Tensor, chunked) -> torch.Tensor:
    """Mean next-token loss of a batch of tokens: the model's own, or the chunked LM-head loss (never the whole
    logits), as lisa-finetune computes it by default."""
    if chunked is not None:
        loss = chunked({"input_ids": batch, "attention_mask": torch.ones_like(batch), "labels": batch})
        if loss is not None:
            return loss / (batch.shape[0] * (batch.shape[1] - 1))
    return model(input_ids=batch, labels=batch).loss


def failure(method: str, exc: Exception) -> dict:
    # cuBLAS / Triton allocation failures are not OutOfMemoryError, but say "out of memory".
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in str(exc).lower():
        return {"method": method, "status": "OOM"}
    traceback.print_exc()
    return {"method": method, "status": f"error: {type(exc).__name__}: {exc}"}


def run_figures(method: str, run: TrainingRun, args, device: torch.device) -> dict:
    """Memory held, step time (warm-up steps left out), switch stall and losses of a finished run."""
    model, times_ms = run.model, run.step_times_ms
    timed = [(s, t) for s, t in enumerate(times_ms) if s >= args.warmup]
    plain = [t for s, t in timed if not is_switch_step(method, s, args.interval)] or [t for _, t in timed]
    switch = [t for s, t in timed if is_switch_step(method, s, args.interval)]
    stats = summarize(plain)
    figures = dict(
        model_params=run.model_params, model_gb=run.model_gb,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
        params_ever_updated=sum(p.numel() for p in model.parameters() if id(p) in run.updated),
        device_state_gb=run.device_state_peak / GB,
        median_step_ms=stats["median_ms"], p20_step_ms=stats["p20_ms"], p80_step_ms=stats["p80_ms"],
        tokens_per_s=args.batch_size * args.seq_len * world_size() / (stats["median_ms"] * 1e-3),
        switch_steps=[s for s, _ in timed if is_switch_step(method, s, args.interval)],
        switch_stall_ms=(summarize(switch)["median_ms"] - stats["median_ms"]) if switch else None,
        loss_first=run.losses[0], loss_final=run.losses[-1],
        losses=run.losses, step_times_ms=times_ms,
        host_state_gb=run.bank.bytes_held / GB if run.bank is not None else None,
        bank_backend=run.bank.backend if run.bank is not None else None,
    )
    if run.data_parallel is not None:
        figures.update(run.data_parallel.report(device, run.comm_bytes))
    return figures


def peak_memory_figures(device: torch.device, rss0: int | None) -> dict:
    """Peak GPU memory of the whole method; on CPU, in a process of its own, the growth of the resident set."""
    from lisa_trainer.runlog import peak_host_rss_bytes

    cuda = device.type == "cuda"
    return dict(
        peak_allocated_gb=torch.cuda.max_memory_allocated(device) / GB if cuda else None,
        peak_reserved_gb=torch.cuda.max_memory_reserved(device) / GB if cuda else None,
        peak_rss_delta_gb=(peak_host_rss_bytes() - rss0) / GB
        if rss0 is not None else None,
    )


# ----------------------------------------------------------------------------------------------------------------
# Driver


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    p.add_argument("--steps", type=int, default=None, help="training steps per method (default: per shape)")
    p.add_argument("--warmup", type=int, default=3, help="first steps left out of the step-time figures")
    p.add_argument("--seq-len", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--n-batches", type=int, default=4, help="distinct synthetic batches, cycled")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16"], default="auto",
                   help="model dtype; auto: bfloat16 on CUDA, float32 on CPU")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--lora-rank", type=int, default=None, help="default: 128 (8 on the tiny shape)")
    p.add_argument("--n-active", type=int, default=2, help="LISA γ: middle layers trained per period")
    p.add_argument("--interval", type=int, default=20, help="LISA K: steps per period")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prefetch-steps", type=int, default=1,
                   help="LisaConfig.prefetch_steps: steps ahead of a switch that parked state starts coming back")
    p.add_argument("--no-update-norms", dest="track_update_norms", action="store_false",
                   help="LisaConfig(track_update_norms=False): no per-period host snapshot of the trained weights")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default on CPU: 1; shared 2-core machines make 2 threads erratic)")
    p.add_argument("--isolate", choices=["auto", "yes", "no"], default="auto",
                   help="one process per method (auto: yes on CUDA, no on CPU)")
    p.add_argument("--method-timeout", type=float, default=600.0, help="seconds per isolated method")
    p.add_argument("--time-budget", type=float, default=None,
                   help="seconds for the whole run; methods not started in time are recorded as skipped")
    p.add_argument("--name", default=None, help="results name (default: finetune-<shape>)")
    p.add_argument("--results-dir", default=None, help="default: $LISA_BENCH_RESULTS, else benchmarks/results")
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--nproc", type=int, default=1,
                   help="ranks per method, data parallel under torchrun (one GPU each; gloo processes on CPU)")
    p.add_argument("--fsdp", action="store_true", help="with --nproc: shard with FSDP2 instead of replicating")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute every decoder layer's activations in backward (every method)")
    p.add_argument("--offload-frozen-layers", type=int, default=0,
                   help="LisaConfig.offload_frozen_layers for our LISA methods: frozen layers' weights in host "
                        "memory (needs --gradient-checkpointing)")
    p.add_argument("--chunked-loss", action="store_true",
                   help="every method computes its loss with the chunked LM-head loss (lisa-finetune's default), "
                        "never the whole logits")
    p.add_argument("--memory-limit-gb", type=float, default=None,
                   help="on CUDA, cap each method's allocations at this many GB (10^9 B; "
                        "torch.cuda.set_per_process_memory_fraction), as on a smaller card")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    shape = SHAPES[args.shape]
    args.steps = args.steps if args.steps is not None else shape["steps"]
    args.seq_len = args.seq_len or shape["seq_len"]
    args.batch_size = args.batch_size or shape["batch_size"]
    args.lora_rank = args.lora_rank or shape["lora_rank"]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    if args.prefetch_steps < 0:
        p.error("--prefetch-steps must be >= 0")
    if args.offload_frozen_layers < 0 or (args.offload_frozen_layers and not args.gradient_checkpointing):
        p.error("--offload-frozen-layers must be >= 0 and needs --gradient-checkpointing")
    if args.memory_limit_gb is not None and args.memory_limit_gb <= 0:
        p.error("--memory-limit-gb must be > 0")
    args.lisa_config = {"offload_frozen_layers": args.offload_frozen_layers} if args.offload_frozen_layers else {}
    args.warmup = min(args.warmup, args.steps - 1)
    return args


def resolve(args):
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.dtype == "auto":
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    else:
        dtype = getattr(torch, args.dtype)
    isolated = args.isolate == "yes" or (args.isolate == "auto" and device.type == "cuda") or args.nproc > 1
    if args.threads is not None or device.type == "cpu":
        torch.set_num_threads(args.threads or 1)
    return device, dtype, isolated


def run_isolated(method: str, argv: list[str], timeout: float, nproc: int = 1) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [*launcher(nproc), "-m", __spec__.name, *argv, "--worker", method, "--worker-out", str(out)]
        try:
            proc = subprocess.run(cmd, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"method": method, "status": f"timeout after {timeout:.0f} s"}
        if out.exists():
            return json.loads(out.read_text())
        return {"method": method, "status": f"crashed (exit code {proc.returncode})"}


def add_comparisons(results: list[dict]) -> dict:
    """Ratios the package's claims are judged by, from whatever methods ran and finished."""
    by = {r["method"]: r for r in results if r.get("status") == "ok"}
    mem_key = "peak_allocated_gb" if any(r.get("peak_allocated_gb") for r in by.values()) else "device_state_gb"
    out = {"memory_figure": mem_key}
    for r in results:
        if r.get("status") != "ok":
            continue
        for ref in ("full", "lora"):
            if ref in by and by[ref].get(mem_key):
                r[f"mem_vs_{ref}"] = r[mem_key] / by[ref][mem_key]
    park, lora, full = by.get("lisa-park"), by.get("lora"), by.get("full")
    if park and lora:
        out["park_memory_at_or_below_lora"] = park[mem_key] <= lora[mem_key]
        out["park_step_time_at_or_below_lora"] = park["median_step_ms"] <= lora["median_step_ms"]
    if park and full:
        out["park_memory_vs_full"] = park[mem_key] / full[mem_key]
        out["park_memory_at_most_45pct_of_full"] = park[mem_key] <= 0.45 * full[mem_key]
    return out


def plot(results: list[dict], payload: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mem_key = payload["comparisons"]["memory_figure"]
    names = [r["method"] for r in results]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    for ax, key, label in ((axes[0], mem_key, mem_key.replace("_gb", " (GB)").replace("_", " ")),
                           (axes[1], "median_step_ms", "median step time (ms)")):
        values = [r.get(key) if r.get("status") == "ok" else None for r in results]
        bars = ax.bar(names, [v or 0 for v in values], color="tab:blue")
        for bar, r, v in zip(bars, results, values):
            text = f"{v:.3g}" if v is not None else r["status"].split(":")[0]
            ax.annotate(text, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                        fontsize=8)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", rotation=30)
    for r in results:
        if r.get("status") == "ok":
            axes[2].plot(r["losses"], label=r["method"])
    axes[2].set_xlabel("step")
    axes[2].set_ylabel("training loss")
    axes[2].legend(fontsize=8)
    env = payload["environment"]
    fig.suptitle(f"bench_finetune --shape {payload['config']['shape']} on {env['device']} "
                 f"(seq {payload['config']['seq_len']} x batch {payload['config']['batch_size']}, "
                 f"{payload['config']['dtype']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    device, dtype, isolated = resolve(args)
    if args.worker:  # child process: one method, result as JSON
        if world_size() > 1 and device.type == "cuda":  # one GPU per rank, as torchrun numbers them
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        result = run_method(args.worker, args, device, dtype, isolated=True)
        if rank() == 0:
            Path(args.worker_out).write_text(json.dumps(result))
        return 0

    start = time.monotonic()
    results = []
    for method in args.methods:
        elapsed = time.monotonic() - start
        if args.time_budget is not None and elapsed > args.time_budget:
            results.append({"method": method, "status": "skipped: time budget"})
            continue
        print(f"[bench_finetune] {method} ({args.shape}, {args.steps} steps, {device.type})", flush=True)
        if isolated:
            timeout = args.method_timeout
            if args.time_budget is not None:
                timeout = max(1.0, min(timeout, args.time_budget - elapsed))
            results.append(run_isolated(method, worker_argv(argv), timeout, args.nproc))
        else:
            results.append(run_method(method, args, device, dtype, isolated=False))

    payload = {
        "benchmark": "finetune",
        "config": dict(shape=args.shape, model=SHAPES[args.shape]["config"], steps=args.steps, warmup=args.warmup,
                       seq_len=args.seq_len, batch_size=args.batch_size, dtype=str(dtype).removeprefix("torch."),
                       lr=args.lr, weight_decay=args.weight_decay, lora_rank=args.lora_rank,
                       n_active=args.n_active, interval=args.interval, prefetch_steps=args.prefetch_steps,
                       seed=args.seed, isolated=isolated,
                       track_update_norms=args.track_update_norms, nproc=args.nproc, fsdp=args.fsdp,
                       gradient_checkpointing=args.gradient_checkpointing, chunked_loss=args.chunked_loss,
                       offload_frozen_layers=args.offload_frozen_layers, memory_limit_gb=args.memory_limit_gb,
                       torch_threads=torch.get_num_threads()),
        "environment": environment(device),
        "comparisons": add_comparisons(results),
        "results": results,
    }
    columns = ["method", "status", "peak_allocated_gb", "peak_reserved_gb", "device_state_gb", "mem_vs_full",
               "mem_vs_lora", "median_step_ms", "tokens_per_s", "switch_stall_ms", "loss_final"]
    if args.nproc > 1:
        columns.insert(-1, "grad_comm_bytes_per_step")
    if device.type != "cuda":  # no GPU peaks; a fresh process per method makes the RSS growth meaningful
        columns = [c for c in columns if c not in ("peak_allocated_gb", "peak_reserved_gb")]
        if isolated:
            columns.insert(2, "peak_rss_delta_gb")
    print_table([{**r, "status": r["status"].split(":")[0]} for r in results], columns,
                title=f"\nfinetune {args.shape} on {payload['environment']['device']}, {dtype}, "
                      f"seq {args.seq_len} x batch {args.batch_size}, {args.steps} steps")
    for r in results:
        if r["status"] != "ok":
            print(f"  {r['method']}: {r['status']}")
    name = args.name or f"finetune-{args.shape}"
    save_results(name, payload, device, args.results_dir,
                 chart=None if args.no_plot else lambda png: plot(results, payload, png))
    return 0


if __name__ == "__main__":
    sys.exit(main())
