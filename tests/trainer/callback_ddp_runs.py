"""The 2-rank runs of test_callback_ddp.py, one torchrun launch: `torchrun --nproc_per_node 2 callback_ddp_runs.py OUT`.

Hugging Face `Trainer` and TRL `SFTTrainer` with `LisaCallback`, as a user's script has them, under gradient
checkpointing off / non-reentrant / reentrant and `ddp_find_unused_parameters` unset / True / False, one after the
other in the same process group (starting a rank costs more than a run). Each rank saves what it saw in
OUT/rank{r}.pt: weights, period logs, the Trainer's log history, errors.
"""

import sys
import traceback
from pathlib import Path

import torch
import torch.distributed as dist

from test_callback import N_LAYERS, _FrozenLayersStayPut, _Tokens, tiny_llama, training_args

from lisa_kernels.sparse_rows import ROWS
from lisa_trainer import LisaCallback, LisaConfig

STEPS = 6
# name -> (TrainingArguments overrides, LisaCallback keywords)
TRAINER_RUNS = {
    "plain": ({"report_to": ["tensorboard"]}, {}),
    "plain_find_unused_false": ({"ddp_find_unused_parameters": False}, {}),
    "checkpointing": ({"gradient_checkpointing": True}, {}),
    "checkpointing_find_unused_true": ({"gradient_checkpointing": True, "ddp_find_unused_parameters": True}, {}),
    "reentrant": ({"gradient_checkpointing": True, "gradient_checkpointing_kwargs": {"use_reentrant": True}}, {}),
    "reentrant_find_unused_true": ({"gradient_checkpointing": True, "ddp_find_unused_parameters": True,
                                    "gradient_checkpointing_kwargs": {"use_reentrant": True}}, {}),
    "parked_trainer_optimizer": ({"optim": "adamw_torch"}, {"state_policy": "park"}),
    # FusedAdamW with the input embedding's row-sparse moments and bf16 embedding / head moments
    "optimizer_for": ({"gradient_checkpointing": True},
                      {"state_policy": "park", "optimizer_for": {"embedding_state_dtype": "bfloat16",
                                                                 "state_policy": "park"}}),
    # DDP reducing the whole model: the usual way, for comparison
    "ddp_whole_model": ({"ddp_find_unused_parameters": True}, {"gradient_sync": "ddp"}),
    "ddp_whole_model_checkpointing": ({"gradient_checkpointing": True}, {"gradient_sync": "ddp"}),
    # trainer.add_callback(...) after the Trainer is built: too late to keep frozen layers out of its DDP
    "added_later": ({"gradient_checkpointing": True}, {"add_later": True}),
    "added_later_find_unused_true": ({"ddp_find_unused_parameters": True}, {"add_later": True}),
}


def lisa(**keywords):
    return LisaCallback(**{"n_active_layers": 1, "interval_steps": 2, "seed": 3, "state_policy": "keep", **keywords})


def run_trainer(out: Path, overrides: dict, lisa_keywords: dict, resume=None, **extra) -> dict:
    from transformers import Trainer

    model = tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(out, max_steps=STEPS, logging_strategy="steps", logging_steps=1, ddp_timeout=60,
                         **{**overrides, **extra})
    add_later = lisa_keywords.pop("add_later", False)
    lean = lisa_keywords.pop("optimizer_for", None)
    callback = lisa(**lisa_keywords)
    checker = _FrozenLayersStayPut(callback)
    callbacks = [checker] if add_later else [callback, checker]
    optimizers = (None if lean is None else LisaCallback.optimizer_for(model, args, LisaConfig(**lean)), None)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=callbacks, optimizers=optimizers)
    if add_later:
        trainer.add_callback(callback)
    trainer.train(resume_from_checkpoint=resume)
    return summarize(trainer, callback, checker, initial)


def run_sft(out: Path, overrides: dict) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lisa_trainer.demo import build_demo_tokenizer

    tok = build_demo_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(len(tok))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    texts = [f"question {i}: what is {i} plus {i}? answer: {2 * i}." for i in range(32)]
    config = SFTConfig(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
                       use_cpu=True, save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, max_length=32,
                       dataloader_num_workers=0, ddp_timeout=60, **overrides)
    callback = lisa()
    checker = _FrozenLayersStayPut(callback)
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tok, callbacks=[callback, checker])
    trainer.train()
    return summarize(trainer, callback, checker, initial) | {"gradient_checkpointing": config.gradient_checkpointing}


def run_fsdp2(optim: str, policy: str) -> dict:
    """LisaCallback's events around a loop of a model sharded with FSDP2 (`fully_shard`, one unit per decoder layer
    plus the root, as accelerate's FSDP2 with TRANSFORMER_BASED_WRAP shards it; accelerate's FSDP needs GPUs)."""
    import lisa_trainer.callback

    sharding = lisa_trainer.callback._trainer_sharding
    lisa_trainer.callback._trainer_sharding = lambda args: "fsdp2"  # what the Trainer's accelerator reports then
    try:
        return _train_fsdp2(optim, policy)
    finally:
        lisa_trainer.callback._trainer_sharding = sharding


def _train_fsdp2(optim: str, policy: str) -> dict:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import TrainerControl, TrainerState

    model = tiny_llama()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    if optim == "optimizer_for":  # as lisa-finetune under FSDP2: dense embedding state, gathered whole by checkpoints
        optimizer = LisaCallback.optimizer_for(model, lr=1e-2, cfg=LisaConfig(state_policy=policy,
                                                                              sparse_embedding_state=False))
    else:
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    callback = lisa(state_policy=policy)
    args, state, control = training_args(Path("unused")), TrainerState(), TrainerControl()
    callback.on_train_begin(args, state, control, model=model, optimizer=optimizer)
    data = _Tokens()
    with_grads = []
    for step in range(STEPS):
        callback.on_step_begin(args, state, control)
        batch = data.ids[4 * step + 2 * dist.get_rank():][:2]
        model(input_ids=batch, labels=batch).loss.backward()
        with_grads.append((sorted({i for i, layer in enumerate(model.model.layers)
                                   if any(p.grad is not None for p in layer.parameters())}),
                           list(callback.controller.active_layers)))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.global_step += 1
        callback.on_step_end(args, state, control)
    callback.on_train_end(args, state, control)
    parker = callback.controller.parker
    names = {p: n for n, p in model.named_parameters()}
    return {"layers_with_gradients": with_grads, "period_log": callback.controller.period_log,
            "data_parallel": callback.data_parallel,
            "parked": {names[p]: (sum(v.read().numel() for v in optimizer.state[p].values() if hasattr(v, "read")),
                                  p.to_local().numel(), p.numel())
                       for p in (parker.parked_params if policy == "park" else [])}}


def summarize(trainer, callback, checker, initial) -> dict:
    model = trainer.model
    layer = sum(p.numel() * p.element_size() for p in model.model.layers[0].parameters())
    always = sum(p.numel() * p.element_size() for p in model.parameters()) - N_LAYERS * layer
    return {"weights": {n: p.detach().clone() for n, p in model.named_parameters()},
            "initial": initial,
            "period_log": callback.controller.period_log,
            "frozen_layer_failures": checker.failures,
            "steps": checker.steps,
            "log_history": trainer.state.log_history,
            "tensorboard": tensorboard_scalars(Path(trainer.args.output_dir)),
            "active_set_bytes": always + callback.config.n_active_layers * layer,
            "embedding_state": embedding_state(model, trainer.optimizer),
            "parked_bytes": (callback.controller.parker.bank.bytes_held if callback.config.state_policy == "park"
                             else 0)}


def embedding_state(model, optimizer) -> dict:
    """Input embedding and head: (moment dtype, rows with state or None for dense state)."""
    state = getattr(optimizer, "optimizer", optimizer).state
    found = {}
    for name, p in (("input", model.get_input_embeddings().weight), ("head", model.get_output_embeddings().weight)):
        entry = state.get(p, {})
        if "exp_avg" in entry:
            found[name] = (entry["exp_avg"].dtype, entry[ROWS].numel() if ROWS in entry else None)
    return found


def tensorboard_scalars(out: Path) -> dict[str, list[float]]:
    """What the Trainer's TensorBoard reporting wrote (rank 0), by tag."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in out.glob("runs/*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        for tag in accumulator.Tags()["scalars"]:
            found[tag] = [e.value for e in accumulator.Scalars(tag)]
    return found


def attempt(results: dict, name: str, fn, *args, **kwargs) -> None:
    try:
        results[name] = fn(*args, **kwargs)
    except Exception as e:  # noqa: BLE001 - recorded for the test to judge
        results[name] = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def main(out: Path) -> None:
    torch.set_num_threads(1)
    results = {}
    for name, (overrides, lisa_keywords) in TRAINER_RUNS.items():
        attempt(results, name, run_trainer, out / name, overrides, dict(lisa_keywords))
        dist.barrier()  # a run that failed on one rank only must not pair its collectives with the next run's
    attempt(results, "saved", run_trainer, out / "saved", {"gradient_checkpointing": True}, {},
            save_strategy="steps", save_steps=4)
    attempt(results, "resumed", run_trainer, out / "saved", {"gradient_checkpointing": True}, {},
            resume=str(out / "saved" / "checkpoint-4"))
    # rank 1 samples with another seed: the first step must refuse to train
    attempt(results, "mismatched_seeds", run_trainer, out / "mismatch", {}, {"seed": dist.get_rank()})
    dist.barrier()
    attempt(results, "mismatched_module_seeds", run_trainer, out / "mismatch_module", {},
            {"seed": dist.get_rank(), "granularity": "module"})
    dist.barrier()
    attempt(results, "fsdp2_optimizer_for_park", run_fsdp2, "optimizer_for", "park")
    attempt(results, "fsdp2_adamw_keep", run_fsdp2, "adamw_torch", "keep")
    attempt(results, "sft", run_sft, out / "sft", {})
    attempt(results, "sft_find_unused_false", run_sft, out / "sft_false", {"ddp_find_unused_parameters": False})
    torch.save(results, out / f"rank{dist.get_rank()}.pt")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
