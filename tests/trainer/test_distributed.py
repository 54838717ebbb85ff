"""Data-parallel LISA on 2 CPU processes (gloo): the same run as one process with the global batch, only the active
set communicated, one schedule checked, bit-identical resume, one log and one model from torchrun, failures that
end every rank.

The 2-rank scenarios share one spawn (module fixture `ddp`): starting a process with torch and transformers costs
seconds on a busy 2-core machine, a 4-step run of the tiny model much less. That shared spawn is why the file stays
whole (~730 lines): split, each part would start its own ranks. The sharded checkpoint's own checks (host memory,
parked state, a rank killed while saving) are in test_sharded_checkpoint.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from ranks import free_port, rank_entry

from lisa_trainer import LisaConfig
from lisa_trainer.data import load_and_tokenize
from lisa_trainer.demo import build_demo_model, build_demo_tokenizer, demo_dataset_path
from lisa_trainer.distributed import OneProcess
from lisa_trainer.runlog import read_log
from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments

WORLD = 2
SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1)
BATCH, ACCUM, STEPS = 2, 2, 4  # per rank; the single-process reference uses BATCH * WORLD
FSDP_STEPS = 6
ONE_PROCESS, ONE_PROCESS_SAVED = "one_process", 3  # a one-process run of FSDP_STEPS steps, saved at step 3

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


def _trainer(out, tok, data, *, batch, n_active=1, seed=0, policy="keep", granularity="layer", **kw):
    args = dict(output_dir=str(out), learning_rate=3e-3, max_steps=STEPS, per_device_train_batch_size=batch,
                gradient_accumulation_steps=ACCUM, warmup_steps=0, progress=False, save_model=False, ddp_timeout=60,
                lr_scheduler_type="constant")  # runs of FSDP_STEPS and STEPS agree on their first STEPS steps
    args.update(kw)
    lisa = LisaConfig(n_active_layers=n_active, interval_steps=2, state_policy=policy, seed=seed, granularity=granularity)
    return LisaTrainer(build_demo_model(tok, seed=0, **SMALL), tok, data, LisaTrainingArguments(**args), lisa)


def _weights(trainer) -> dict:
    return {k: v.detach().clone() for k, v in trainer.model.state_dict().items()}


def _full_weights(trainer) -> dict:
    """The whole weights of an FSDP model, gathered to the CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(trainer.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _record_first_gradients(trainer) -> dict:
    """Filled at the first optimizer step with the gradients it receives (after the all-reduce, with several ranks)."""
    grads, names = {}, {p: n for n, p in trainer.model.named_parameters()}

    def hook(optimizer, args, kwargs):
        if not grads:
            # to_dense: in one process the input embedding's gradient is sparse (dense under data parallelism)
            grads.update({names[p]: p.grad.detach().clone().to_dense() for group in optimizer.param_groups
                          for p in group["params"] if p.grad is not None})

    trainer.optimizer.register_step_pre_hook(hook)
    return grads


def _parked(trainer) -> dict[str, tuple[int, int, int]]:
    """name -> (elements of its state in the host bank, of this rank's shard, of the whole parameter)."""
    names = {p: n for n, p in trainer.model.named_parameters()}
    return {names[p]: (sum(v.read().numel() for v in trainer.optimizer.state[p].values() if hasattr(v, "read")),
                       p.to_local().numel(), p.numel()) for p in trainer.optimizer.state_parker.parked_params}


def _scenarios(rank: int, out: Path) -> None:
    from lisa_trainer.distributed import DistributedError

    tok = build_demo_tokenizer()
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    results = {}
    for n_active in (1, 2):  # n_active=2 also writes checkpoint-2 for the resume below
        t = _trainer(out / f"active{n_active}", tok, data, batch=BATCH, n_active=n_active, save_steps=2)
        grads = _record_first_gradients(t)
        summary = t.train()
        results[f"active{n_active}"] = {"weights": _weights(t), "summary": summary, "grads": grads,
                                        "trainable": t.dist.grad_sync.n_elements}
        t_ddp_state = t.optimizer.state
    resumed = _trainer(out / "resumed", tok, data, batch=BATCH, n_active=2)
    resumed.train(resume_from_checkpoint=out / "active2" / "checkpoint-2")
    results["resumed"] = {"weights": _weights(resumed)}
    # FSDP: 3 periods, layers (1, 2), (1, 3), (2, 3) with seed 0; a checkpoint after every step (4 holds the weights
    # DDP ends with, 5 is in the middle of a period).
    sharded = _trainer(out / "fsdp", tok, data, batch=BATCH, n_active=2, fsdp=True, max_steps=FSDP_STEPS, save_steps=1)
    sharded.train()
    results["fsdp"] = {"weights": _full_weights(sharded),
                       "period_log": sharded.controller.period_log,
                       "state_elements": sum(t.numel() for st in sharded.optimizer.state.values()
                                             for t in st.values() if t.dim() > 0),
                       # two moments per trained element (DDP's embedding state is row-sparse, FSDP's dense)
                       "ddp_state_elements": sum(2 * p.numel() for p in t_ddp_state)}
    # Layer 2 is parked in period 1 and trains again in period 2; layer 1 is parked from period 2 on.
    parking = _trainer(out / "fsdp_park", tok, data, batch=BATCH, n_active=2, fsdp=True, max_steps=FSDP_STEPS,
                       policy="park", save_steps=5)
    parking.train()
    results["fsdp_park"] = {"weights": _full_weights(parking),
                            "period_log": parking.controller.period_log, "parked": _parked(parking)}
    resumed = _trainer(out / "fsdp_resumed", tok, data, batch=BATCH, n_active=2, fsdp=True, max_steps=FSDP_STEPS,
                       policy="park")
    resumed.train(resume_from_checkpoint=out / "fsdp_park" / "checkpoint-5")
    results["fsdp_resumed"] = {"weights": _full_weights(resumed), "parked": _parked(resumed)}
    # Module-wise, 4 periods; FSDP resumed from the middle of period 2.
    module_runs = {"module_ddp": {}, "module_fsdp": {"fsdp": True, "save_steps": 5},
                   "module_fsdp_resumed": {"fsdp": True, "resume": out / "module_fsdp" / "checkpoint-5"}}
    for run, kw in module_runs.items():
        resume = kw.pop("resume", None)
        t = _trainer(out / run, tok, data, batch=BATCH, policy="park", granularity="module", max_steps=8, **kw)
        t.train(resume_from_checkpoint=resume)
        results[run] = {"weights": _full_weights(t) if t.dist.fsdp else _weights(t),
                        "period_log": t.controller.period_log}
    for name, fsdp in (("ddp_from_one", False), ("fsdp_from_one", True)):  # a one-process run's checkpoint
        t = _trainer(out / name, tok, data, batch=BATCH, n_active=2, fsdp=fsdp, max_steps=FSDP_STEPS)
        t.train(resume_from_checkpoint=out / ONE_PROCESS / f"checkpoint-{ONE_PROCESS_SAVED}")
        results[name] = {"weights": _full_weights(t) if fsdp else _weights(t)}
    # Resharded: data-parallel from FSDP's checkpoint in the middle of period 2, FSDP from data-parallel's at step 2
    # (whose embedding state is row-sparse: expanded, then cut into shards).
    # Each is loaded and saved again as it was loaded (checkpoint-N of `<name>_resaved`), then trains on.
    from lisa_trainer.sharded_checkpoint import save_sharded_checkpoint

    for name, fsdp, source, steps in (("ddp_from_fsdp", False, out / "fsdp" / "checkpoint-5", FSDP_STEPS),
                                      ("fsdp_from_ddp", True, out / "active2" / "checkpoint-2", STEPS)):
        t = _trainer(out / name, tok, data, batch=BATCH, n_active=2, fsdp=fsdp, max_steps=steps)
        t.resume(source)
        save_sharded_checkpoint(out / f"{name}_resaved" / source.name, model=t.model, optimizer=t.optimizer,
                                controller=t.controller, state=t._trainer_state(), parallel=t.dist)
        t.train(resume_from_checkpoint=source)
    results["one_row"] = _one_row_state_round_trip()
    try:  # rank 1 samples with another seed: the first switch must refuse to train
        _trainer(out / "mismatch", tok, data, batch=BATCH, seed=rank).train()
    except DistributedError as e:
        results["mismatch"] = str(e)
    try:  # the same with module-wise sampling: the message names modules
        _trainer(out / "module_mismatch", tok, data, batch=BATCH, seed=rank, granularity="module").train()
    except DistributedError as e:
        results["module_mismatch"] = str(e)
    torch.save(results, out / f"rank{rank}.pt")


def _one_row_state_round_trip() -> list[tuple[str, bool]]:
    """FusedAdamW's state of FSDP2 parameters of one row, whose shard on rank 0 has the whole parameter's shape,
    saved and loaded: (the loaded moment's type, equal to the saved one) per parameter."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from lisa_kernels import FusedAdamW

    layer = torch.nn.Linear(4, 1)
    fully_shard(layer, mesh=init_device_mesh("cpu", (WORLD,)))
    optimizer = FusedAdamW(layer.parameters(), lr=1e-2)
    layer(torch.ones(2, 4)).sum().backward()
    optimizer.step()
    saved = optimizer.state_dict()
    optimizer.load_state_dict(saved)
    loaded = [optimizer.state[p]["exp_avg"] for p in layer.parameters()]
    return [(type(m).__name__, torch.equal(m, saved["state"][i]["exp_avg"])) for i, m in enumerate(loaded)]


def _spawn(scenario, out: Path) -> None:
    mp.start_processes(rank_entry, args=(WORLD, free_port(), scenario, str(out)), nprocs=WORLD, join=True,
                       start_method="spawn")


@pytest.fixture(scope="module")
def ddp(tmp_path_factory, tok):
    out = tmp_path_factory.mktemp("ddp")
    # One process, batch BATCH * WORLD: its checkpoint (in the middle of period 1) resumes under 2 ranks below, and
    # its final weights are what those runs must end with.
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    one = _trainer(out / ONE_PROCESS, tok, data, batch=BATCH * WORLD, n_active=2, max_steps=FSDP_STEPS,
                   save_steps=ONE_PROCESS_SAVED)
    one.train()
    one_weights = _weights(one)
    _spawn(_scenarios, out)
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    ranks[0][ONE_PROCESS] = {"weights": one_weights}
    return out, ranks


@pytest.fixture(scope="module")
def single(tmp_path_factory, tok):
    """The reference: one process, batch BATCH * WORLD, same seed."""
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    runs = {}
    for n_active in (1, 2):
        t = _trainer(tmp_path_factory.mktemp("single"), tok, data, batch=BATCH * WORLD, n_active=n_active)
        assert isinstance(t.dist, OneProcess)
        grads = _record_first_gradients(t)
        runs[n_active] = (t.train(), grads)
    return runs


def _losses(out: Path) -> list[float]:
    return [r["loss"] for r in read_log(out / "train_log.jsonl") if r["kind"] == "step"]


@pytest.mark.parametrize("n_active", [1, 2])
def test_two_ranks_match_one_process_with_the_global_batch(ddp, single, n_active):
    out, ranks = ddp
    ref_summary, ref_grads = single[n_active]
    log = read_log(out / f"active{n_active}" / "train_log.jsonl")
    steps = [r for r in log if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))  # rank 0 alone logs, each step once
    ddp_losses = [r["loss"] for r in steps]
    assert ranks[0][f"active{n_active}"]["summary"]["first_loss"] == ddp_losses[0]
    assert ddp_losses[0] == pytest.approx(ref_summary["first_loss"], rel=1e-6)
    assert ddp_losses[-1] == pytest.approx(ref_summary["last_loss"], rel=1e-5)
    # The gradients the first step receives: the all-reduced sum of two half-batch sums vs one sum, ~1e-7 relative
    # in fp32; a missing or doubled share would differ by its own size. (Weights after AdamW are no measure of
    # this: its first step moves a weight by ~lr * sign(grad), so a component near eps flips with rounding alone.)
    grads = ranks[0][f"active{n_active}"]["grads"]
    assert sorted(grads) == sorted(ref_grads) and grads
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], rtol=1e-5, atol=1e-6 * float(ref_grads[name].abs().max()),
                                   msg=name)


def test_ranks_end_with_identical_weights(ddp):
    _, ranks = ddp
    for run in ("active1", "active2", "resumed"):
        for name, w in ranks[0][run]["weights"].items():
            assert torch.equal(w, ranks[1][run]["weights"][name]), (run, name)


def test_allreduce_covers_the_active_set_only(ddp):
    out, ranks = ddp
    sent = {}
    for n_active in (1, 2):
        steps = [r for r in read_log(out / f"active{n_active}" / "train_log.jsonl") if r["kind"] == "step"]
        sent[n_active] = {r["allreduce_bytes"] for r in steps}
        assert len(sent[n_active]) == 1  # every step: the same layer count, whichever layers
    model = build_demo_model(build_demo_tokenizer(), **SMALL)
    layer = sum(p.numel() for p in model.model.layers[0].parameters()) * 4
    always = (model.model.embed_tokens.weight.numel() + model.lm_head.weight.numel() + model.model.norm.weight.numel()) * 4
    assert sent[1] == {always + layer} and sent[2] == {always + 2 * layer}
    assert ranks[0]["active1"]["trainable"] * 4 == always + layer


def test_resume_under_two_ranks_is_bit_identical(ddp):
    _, ranks = ddp
    for name, w in ranks[0]["active2"]["weights"].items():
        assert torch.equal(w, ranks[0]["resumed"]["weights"][name]), name


def test_schedule_mismatch_is_an_error_naming_both_ranks_layers(ddp):
    _, ranks = ddp
    for r in range(WORLD):
        msg = ranks[r]["mismatch"]
        assert "LISA schedule differs between ranks" in msg and "rank 0 trains layers [" in msg and "rank 1 trains [" in msg
        assert "(settings [0, 0, 2])" in msg and "(settings [0, 1, 2])" in msg  # period, seed, interval
        assert "rank 0 trains modules [" in ranks[r]["module_mismatch"]


# ------------------------------------------------------------------------------------------------- failures


def _fails_on_rank1(rank: int, out: Path) -> None:
    """Rank 1 meets bad data in the third step, after two checkpoints."""
    tok = build_demo_tokenizer()
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    t = _trainer(out, tok, data, batch=BATCH, save_steps=1, ddp_timeout=30)
    if rank == 1:
        micro_batch = t.micro_batch

        def bad_data(index):
            if index >= 2 * ACCUM:
                raise ValueError("example 17 has no tokens")
            return micro_batch(index)

        t.micro_batch = bad_data
    _train_and_record_the_error(t, rank, out)


def _fsdp_fails_on_rank1_while_saving(rank: int, out: Path) -> None:
    """With FSDP, rank 1 runs out of memory writing its shards of the third checkpoint, while rank 0 writes its own."""
    from lisa_trainer import sharded_storage

    tok = build_demo_tokenizer()
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    t = _trainer(out, tok, data, batch=BATCH, n_active=2, save_steps=1, ddp_timeout=30, fsdp=True)
    if rank == 1:
        write = sharded_storage.write_tensor

        def out_of_memory(f, tensor):
            if t.step == 3:
                raise MemoryError("no room to write the checkpoint")
            return write(f, tensor)

        sharded_storage.write_tensor = out_of_memory
    _train_and_record_the_error(t, rank, out)


def _fsdp_rank1_killed_in_a_forward(rank: int, out: Path) -> None:
    """With FSDP, rank 1 is killed (no message left behind) in the third step's forward, while rank 0 is in one of
    FSDP's own all-gathers."""
    tok = build_demo_tokenizer()
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    t = _trainer(out, tok, data, batch=BATCH, n_active=2, ddp_timeout=30, fsdp=True)
    if rank == 1:
        def kill(module, args):
            if t.step == 2:
                os.kill(os.getpid(), signal.SIGKILL)

        t.model.model.layers[2].register_forward_pre_hook(kill)
    _train_and_record_the_error(t, rank, out)


def test_a_killed_fsdp_rank_is_one_line_on_the_other(tmp_path):
    """FSDP's collectives run inside forward and backward, not through DataParallel's: their failure is reported as
    every other collective's is, not as gloo's 'Connection closed by peer' traceback."""
    context = mp.start_processes(rank_entry, args=(WORLD, free_port(), _fsdp_rank1_killed_in_a_forward, str(tmp_path)),
                                 nprocs=WORLD, join=False, start_method="spawn")
    for p in context.processes:
        p.join(120)
    assert [p.exitcode for p in context.processes] == [1, -signal.SIGKILL]
    rank0 = (tmp_path / "rank0.err").read_text()
    assert rank0.startswith("DistributedError: rank 0: a collective of the training step failed (") and \
        "another rank probably died" in rank0 and "\n" not in rank0, rank0


def _train_and_record_the_error(trainer, rank: int, out: Path) -> None:
    try:
        trainer.train()
    except BaseException as e:
        (out / f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}")
        raise


@pytest.mark.parametrize("scenario, error", [(_fails_on_rank1, "ValueError: example 17 has no tokens"),
                                             (_fsdp_fails_on_rank1_while_saving,
                                              "MemoryError: no room to write the checkpoint")],
                         ids=["bad-data", "fsdp-out-of-memory-while-saving"])
def test_a_failing_rank_ends_every_rank_with_its_message(tmp_path, scenario, error):
    started = time.monotonic()
    context = mp.start_processes(rank_entry, args=(WORLD, free_port(), scenario, str(tmp_path)), nprocs=WORLD,
                                 join=False, start_method="spawn")
    for p in context.processes:
        p.join(120)
    assert [p.exitcode for p in context.processes] == [1, 1]
    assert time.monotonic() - started < 60  # not the 30 s collective timeout after a hang: at once
    assert error in (tmp_path / "rank1.err").read_text()
    rank0 = (tmp_path / "rank0.err").read_text()
    assert rank0.startswith("DistributedError") and f"rank 1 failed: {error}" in rank0
    from lisa_trainer.checkpoint import latest_checkpoint

    newest = latest_checkpoint(tmp_path)
    assert newest.name == "checkpoint-2" and _sharded_state(newest)["trainer"]["step"] == 2
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".checkpoint")] == []  # no temporary folder left


# ---------------------------------------------------------------------------------------------- lisa-finetune


def _torchrun_lisa_finetune(out: Path, *more: str) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m lisa_trainer.cli --demo ...` on the CPU, as a user starts it."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # FusedAdamW's PyTorch path on CPU
    root = Path(__file__).resolve().parents[2]
    env.update(PYTHONPATH=f"{root}{os.pathsep}{root / 'python_api'}", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--master_port",
           str(free_port()), "-m", "lisa_trainer.cli", "--demo", "--output_model_path", str(out),
           "--per_device_train_batch_size", "2", "--block_size", "48", "--disable_tqdm", *more]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_torchrun_lisa_finetune_writes_one_log_and_one_model(tmp_path):
    out = tmp_path / "run"
    done = _torchrun_lisa_finetune(out, "--max_steps", "3", "--eval_steps", "100", "--lisa_interval_steps", "2")
    assert done.returncode == 0, done.stderr[-3000:]
    records = read_log(out / "train_log.jsonl")
    assert [r["step"] for r in records if r["kind"] == "step"] == [1, 2, 3]
    assert [r["kind"] for r in records].count("summary") == 1 and [r["kind"] for r in records].count("config") == 1
    assert all(r["world_size"] == WORLD and r["allreduce_bytes"] > 0 for r in records if r["kind"] == "step")
    assert (out / "model.safetensors").is_file() and (out / "lisa_run.png").is_file()
    assert done.stdout.count("LISA demo finished") == 1, done.stdout
    assert json.loads((out / "config.json").read_text())["model_type"] == "llama"


def test_short_fsdp_runs_under_torchrun_end_cleanly_every_time(tmp_path):
    """Each rank ends without the interpreter's teardown, in which gloo worker threads that FSDP2 leaves running
    could abort the process (SIGABRT, 'terminate called without an active exception': 1 run in 22 before)."""
    for i in range(5):
        out = tmp_path / f"run{i}"
        done = _torchrun_lisa_finetune(out, "--fsdp", "--max_steps", "1", "--validation_split_percentage", "0")
        assert done.returncode == 0 and "terminate called" not in done.stderr, (i, done.stderr[-3000:])
        assert (out / "lisa_run.png").is_file() and done.stdout.count("LISA demo finished") == 1, (i, done.stdout)


# LMFlow's configs/accelerate_fsdp_config.yaml (FSDP1, 8 processes), at 2 processes
LMFLOW_FSDP_CONFIG = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_auto_wrap_policy: TRANSFORMER_BASED_WRAP
  fsdp_backward_prefetch: BACKWARD_PRE
  fsdp_cpu_ram_efficient_loading: true
  fsdp_forward_prefetch: false
  fsdp_offload_params: false
  fsdp_sharding_strategy: FULL_SHARD
  fsdp_state_dict_type: FULL_STATE_DICT
  fsdp_sync_module_states: true
  fsdp_use_orig_params: true
machine_rank: 0
mixed_precision: 'no'
num_machines: 1
num_processes: 2
rdzv_backend: static
same_network: true
use_cpu: false
"""


def test_accelerate_launch_with_lmflows_fsdp_config_shards_lisa_finetune(tmp_path):
    """LMFlow's launch line with our CLI in place of its script: FSDP2 (reduce-scatter of the trainable set), with
    one line saying an FSDP1 config got FSDP2; not a silent replica per rank."""
    config = tmp_path / "accelerate_fsdp_config.yaml"
    config.write_text(LMFLOW_FSDP_CONFIG)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = Path(__file__).resolve().parents[2]
    env.update(PYTHONPATH=f"{root}{os.pathsep}{root / 'python_api'}", OMP_NUM_THREADS="1")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--main_process_port",
           str(free_port()), "-m", "lisa_trainer.cli", "--demo", "--output_model_path", str(out), "--max_steps", "2",
           "--per_device_train_batch_size", "2", "--block_size", "48", "--disable_tqdm", "--eval_steps", "100"]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    steps = [r for r in read_log(out / "train_log.jsonl") if r["kind"] == "step"]
    assert [r["step"] for r in steps] == [1, 2]
    assert all(r["world_size"] == WORLD and r["reduce_scatter_bytes"] > 0 and "allreduce_bytes" not in r for r in steps)
    assert done.stdout.count("fsdp_version: 1): lisa-finetune shards with FSDP2 instead") == 1, done.stdout
    assert (out / "model.safetensors").is_file()


@pytest.mark.parametrize("setting, value, named", [
    ("FSDP_OFFLOAD_PARAMS", "true", "fsdp_offload_params: true"),
    ("FSDP_SHARDING_STRATEGY", "SHARD_GRAD_OP", "fsdp_sharding_strategy other than FULL_SHARD"),
    ("FSDP_RESHARD_AFTER_FORWARD", "false", "fsdp_reshard_after_forward: false"),
])
def test_accelerate_fsdp_settings_without_an_equivalent_are_refused_by_name(setting, value, named):
    from lisa_trainer.distributed import accelerate_fsdp

    lmflow = {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
              "FSDP_OFFLOAD_PARAMS": "false", "FSDP_RESHARD_AFTER_FORWARD": "true",
              "FSDP_ACTIVATION_CHECKPOINTING": "false", "FSDP_AUTO_WRAP_POLICY": "TRANSFORMER_BASED_WRAP"}
    assert accelerate_fsdp({}) == (False, None)
    assert accelerate_fsdp({**lmflow, "FSDP_VERSION": "2"}) == (True, None)
    with pytest.raises(ValueError, match=f"accelerate launch's FSDP config: {named}.* is not supported"):
        accelerate_fsdp({**lmflow, setting: value})


def test_bench_workers_get_the_arguments_without_nproc():
    from benchmarks.data_parallel import launcher, worker_argv

    assert worker_argv(["--nproc", "2", "--steps", "3", "--nproc=4", "--shape", "tiny"]) == ["--steps", "3", "--shape", "tiny"]
    assert launcher(1) == [sys.executable] and launcher(2)[-2:] == ["--nproc_per_node", "2"]


def _checkpoint_weights(path: Path) -> dict:
    """The whole weights in a checkpoint written under torchrun, read in this process."""
    from lisa_trainer.sharded_checkpoint import read_full_tensors

    return read_full_tensors(path)


def _sharded_state(path: Path) -> dict:
    return json.loads((path / "trainer_state.json").read_text())


def test_fsdp_matches_ddp_with_sharded_optimizer_state(ddp):
    out, ranks = ddp
    steps = {run: [r for r in read_log(out / run / "train_log.jsonl") if r["kind"] == "step"] for run in ("active2", "fsdp")}
    assert [r["loss"] for r in steps["fsdp"][:STEPS]] == pytest.approx([r["loss"] for r in steps["active2"]], rel=1e-6)
    # Frozen layers cost no reduce-scatter: the trainable set's gradients only, as DDP all-reduces.
    assert [r["reduce_scatter_bytes"] for r in steps["fsdp"][:STEPS]] == \
        [r["allreduce_bytes"] for r in steps["active2"]]
    at_ddp_end = _checkpoint_weights(out / "fsdp" / f"checkpoint-{STEPS}")  # the full weights, gathered to rank 0
    for name, w in ranks[0]["active2"]["weights"].items():  # same reduction-order tolerance as above
        torch.testing.assert_close(at_ddp_end[name], w, rtol=0, atol=2e-6, msg=name)
    # Each rank holds its shard of the moments that DDP holds on every rank.
    shards = [ranks[r]["fsdp"]["state_elements"] for r in range(WORLD)]
    assert sum(shards) == ranks[0]["fsdp"]["ddp_state_elements"] and max(shards) < 0.51 * sum(shards)


def _periods(out: Path) -> list[dict]:
    return [r for r in read_log(out / "train_log.jsonl") if r["kind"] == "period"]


def test_fsdp_update_norms_equal_ddps(ddp):
    """Each rank measures its shards; one all-reduce per period end gives every rank the whole model's norms."""
    out, ranks = ddp
    ddp_periods, fsdp_periods = _periods(out / "active2"), _periods(out / "fsdp")
    assert [p["layers"] for p in fsdp_periods] == [[1, 2], [1, 3], [2, 3]] and len(ddp_periods) == 2
    for mine, theirs in zip(fsdp_periods, ddp_periods, strict=False):
        assert mine["layers"] == theirs["layers"] and mine["layer_update_norms"]
        # fp32 reduction order only (measured: <= 2.5e-7 relative); one rank's shards alone would be ~30% off.
        assert mine["layer_update_norms"] == pytest.approx(theirs["layer_update_norms"], rel=2e-6)
        assert mine["module_update_norms"] == pytest.approx(theirs["module_update_norms"], rel=2e-6)
    assert ranks[1]["fsdp"]["period_log"] == ranks[0]["fsdp"]["period_log"]  # every rank has the sums


def test_fsdp_resume_under_two_ranks_is_bit_identical(ddp):
    """From a checkpoint in the middle of period 2 of the `park` run: the frozen layer 1's moments come back from
    the file into each rank's bank as its own shard."""
    out, ranks = ddp
    for name, w in ranks[0]["fsdp_park"]["weights"].items():
        assert torch.equal(ranks[0]["fsdp_resumed"]["weights"][name], w), name
    assert _periods(out / "fsdp_resumed") == _periods(out / "fsdp_park")[-1:]  # the period the checkpoint cut
    steps = {run: [r for r in read_log(out / run / "train_log.jsonl") if r["kind"] == "step"]
             for run in ("fsdp_park", "fsdp_resumed")}
    assert [r["loss"] for r in steps["fsdp_resumed"]] == [r["loss"] for r in steps["fsdp_park"][-1:]]
    for r in range(WORLD):
        assert ranks[r]["fsdp_resumed"]["parked"] == ranks[r]["fsdp_park"]["parked"]


def test_fsdp_checkpoints_hold_the_full_state_parked_moments_included(ddp):
    """The same step of the `keep` and `park` runs: equal weights, optimizer state and period-start weights, each
    rank's shards (from its device state or its host bank) together making the whole tensors."""
    from lisa_trainer.sharded_checkpoint import read_full_tensors

    out, ranks = ddp
    model = build_demo_model(build_demo_tokenizer(), **SMALL)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    keep, park = (read_full_tensors(out / run / "checkpoint-5", prefix="optimizer/") for run in ("fsdp", "fsdp_park"))
    layer1 = [n for n in shapes if ".layers.1." in n]
    # trained in periods 0-1, frozen (so parked in the `park` run) at step 5
    assert layer1 and {f"{n}/{key}" for n in layer1 for key in ("exp_avg", "exp_avg_sq")} <= keep.keys()
    assert keep.keys() == park.keys()
    for key, saved in keep.items():
        name, moment = key.rsplit("/", 1)
        if moment != "step":
            assert saved.shape == shapes[name], key
        assert torch.equal(park[key], saved), key
    starts = read_full_tensors(out / "fsdp" / "checkpoint-5", prefix="period_start/")
    assert starts and {n: t.shape for n, t in starts.items()} == {n: shapes[n] for n in starts}
    weights = {run: _checkpoint_weights(out / run / "checkpoint-5") for run in ("fsdp", "fsdp_park")}
    assert weights["fsdp"].keys() == model.state_dict().keys()
    for name, w in weights["fsdp"].items():
        assert torch.equal(weights["fsdp_park"][name], w), name
    for run in ("fsdp", "fsdp_park"):  # each rank wrote its own file
        assert sorted(p.name for p in (out / run / "checkpoint-5" / "shards").iterdir()) == \
            ["index.json", "rank-00000.safetensors", "rank-00001.safetensors"]


def test_an_fsdp_checkpoint_resumes_in_one_process(ddp, tok, tmp_path):
    """A checkpoint holds the full tensors, not the shards: it resumes under any number of ranks, or none."""
    out, ranks = ddp
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    t = _trainer(tmp_path, tok, data, batch=BATCH * WORLD, n_active=2, max_steps=FSDP_STEPS)
    t.train(resume_from_checkpoint=out / "fsdp" / "checkpoint-5")
    resumed = _weights(t)
    for name, w in ranks[0]["fsdp"]["weights"].items():  # the reduction-order tolerance of the tests above
        torch.testing.assert_close(resumed[name], w, rtol=0, atol=2e-6, msg=name)
    (period,) = _periods(tmp_path)
    assert period["layer_update_norms"] == pytest.approx(_periods(out / "fsdp")[-1]["layer_update_norms"], rel=2e-6)


def test_checkpoints_reshard_between_fsdp_and_data_parallel(ddp):
    """A checkpoint written under FSDP resumes data-parallel and the other way round. The state loads exactly (saved
    again, it holds the same tensors; data-parallel's row-sparse embedding moments come back dense from FSDP's
    shards) and training goes on with the uninterrupted run's losses, to fp32 reduction-order rounding."""
    from lisa_kernels import sparse_rows
    from lisa_trainer.sharded_checkpoint import read_full_tensors

    out, _ = ddp
    for run, source in (("ddp_from_fsdp", out / "fsdp" / "checkpoint-5"),
                        ("fsdp_from_ddp", out / "active2" / "checkpoint-2")):
        saved, again = (read_full_tensors(ckpt, prefix="") for ckpt in (source, out / f"{run}_resaved" / source.name))
        rows = {k.rsplit("/", 1)[0]: v for k, v in saved.items() if k.endswith(f"/{sparse_rows.ROWS}")}
        assert (run == "fsdp_from_ddp") == bool(rows)  # data-parallel's embedding state is row-sparse
        assert again.keys() == saved.keys() - {f"{name}/{sparse_rows.ROWS}" for name in rows}
        for key, value in again.items():
            owner = key.rsplit("/", 1)[0]
            if owner in rows and key.rsplit("/", 1)[1] != "step":
                dense = {key.rsplit("/", 1)[1]: saved[key], sparse_rows.ROWS: rows[owner]}
                sparse_rows.expand(dense, torch.empty(value.shape, dtype=torch.bool))
                assert torch.equal(dense[key.rsplit("/", 1)[1]], value), (run, key)
            else:
                assert torch.equal(saved[key], value), (run, key)
    for run, reference in (("ddp_from_fsdp", "fsdp"), ("fsdp_from_ddp", "active2")):
        steps = {r: [x for x in read_log(out / r / "train_log.jsonl") if x["kind"] == "step"] for r in (run, reference)}
        resumed_at = steps[run][0]["step"] - 1
        assert [x["step"] for x in steps[run]] == [x["step"] for x in steps[reference][resumed_at:]]
        assert [x["loss"] for x in steps[run]] == pytest.approx([x["loss"] for x in steps[reference][resumed_at:]],
                                                               rel=1e-6)


def test_fsdp_optimizer_state_of_a_one_row_parameter_loads_as_its_shard(ddp):
    _, ranks = ddp
    for r in range(WORLD):
        assert ranks[r]["one_row"] == [("Tensor", True), ("Tensor", True)]


def test_fsdp_parks_each_ranks_shard_and_equals_keep(ddp):
    out, ranks = ddp
    for name, w in ranks[0]["fsdp"]["weights"].items():
        assert torch.equal(ranks[0]["fsdp_park"]["weights"][name], w), name
    assert ranks[0]["fsdp_park"]["period_log"] == ranks[0]["fsdp"]["period_log"]
    assert [r["loss"] for r in read_log(out / "fsdp_park" / "train_log.jsonl") if r["kind"] == "step"] == \
        [r["loss"] for r in read_log(out / "fsdp" / "train_log.jsonl") if r["kind"] == "step"]
    # Layer 1 ends parked: each rank's host bank holds its own shard of the two moments, never the whole tensor.
    parked = [ranks[r]["fsdp_park"]["parked"] for r in range(WORLD)]
    assert parked[0].keys() == parked[1].keys() and parked[0]
    assert all(".layers.1." in name for name in parked[0])
    for name, (in_bank, local, whole) in parked[0].items():
        assert in_bank == 2 * local and local < whole, name
        assert local + parked[1][name][1] == whole, name


def _nccl_runs(rank: int, out: Path) -> None:
    tok = build_demo_tokenizer()
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    results = {}
    for name, fsdp in (("ddp", False), ("fsdp", True)):
        t = _trainer(out / name, tok, data, batch=BATCH, n_active=2, fsdp=fsdp)
        assert t.device == torch.device("cuda", rank)
        t.train()
        weights = _full_weights(t) if fsdp else _weights(t)
        results[name] = {k: v.cpu() for k, v in (weights or {}).items()}
    torch.save(results, out / f"rank{rank}.pt")


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < WORLD, reason=f"needs {WORLD} CUDA GPUs (NCCL: one rank per GPU)")
def test_nccl_ddp_and_fsdp_match_one_gpu_with_the_global_batch(tmp_path, tok):
    _spawn(_nccl_runs, tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    single = _trainer(tmp_path / "single", tok, data, batch=BATCH * WORLD, n_active=2)
    single.train()
    reference = {k: v.cpu() for k, v in _weights(single).items()}
    for name in ("ddp", "fsdp"):
        steps = [r for r in read_log(tmp_path / name / "train_log.jsonl") if r["kind"] == "step"]
        ref_steps = [r for r in read_log(tmp_path / "single" / "train_log.jsonl") if r["kind"] == "step"]
        assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in ref_steps], rel=1e-5)
        # fp32 (TF32 off by default): cuBLAS/SDPA may pick other kernels for batch 2 than for batch 4, so allow a few
        # times the CPU bound of 2e-6; a gradient missing from one step would move weights by ~lr = 3e-3.
        for k, w in ranks[0][name].items():
            torch.testing.assert_close(w, reference[k], rtol=0, atol=1e-5, msg=f"{name} {k}")
    for k, w in ranks[0]["ddp"].items():
        assert torch.equal(w, ranks[1]["ddp"][k]), k


def test_a_two_rank_checkpoint_resumes_in_one_process(ddp, tok, tmp_path):
    """The batch sequence does not depend on the number of ranks, so a run may resume on another number of them."""
    out, ranks = ddp
    data = load_and_tokenize(demo_dataset_path(), tok, block_size=48)
    t = _trainer(tmp_path, tok, data, batch=BATCH * WORLD, n_active=2)
    t.train(resume_from_checkpoint=out / "active2" / "checkpoint-2")
    resumed = _weights(t)
    for name, w in ranks[0]["active2"]["weights"].items():  # the reduction-order tolerance of the tests above
        torch.testing.assert_close(resumed[name], w, rtol=0, atol=2e-6, msg=name)


def test_module_wise_ranks_agree_and_fsdp_sums_each_ranks_gradient_norms(ddp):
    """Module-wise sampling under DDP and FSDP2: every rank logs the same modules and gradient norms (FSDP2's from
    each rank's shards, summed), so every rank draws the same modules; only those modules' gradients travel."""
    out, ranks = ddp
    logs = {run: _periods(out / run) for run in ("module_ddp", "module_fsdp")}
    for run in logs:
        assert ranks[1][run]["period_log"] == ranks[0][run]["period_log"]
        assert len({tuple(p["modules"]) for p in logs[run]}) > 1
    for mine, theirs in zip(logs["module_fsdp"], logs["module_ddp"], strict=True):
        assert mine["modules"] == theirs["modules"]
        assert mine["module_grad_norms"] == pytest.approx(theirs["module_grad_norms"], rel=2e-5)
    for name, w in ranks[0]["module_ddp"]["weights"].items():
        torch.testing.assert_close(ranks[0]["module_fsdp"]["weights"][name], w, rtol=0, atol=2e-6, msg=name)
    # The resumed run: the same weights, and the cut period's norms from its gradient sums in the checkpoint.
    for name, w in ranks[0]["module_fsdp"]["weights"].items():
        assert torch.equal(ranks[0]["module_fsdp_resumed"]["weights"][name], w), name
    keys = ("period", "modules", "module_grad_norms", "always_grad_norm")
    assert [[p[k] for k in keys] for p in ranks[0]["module_fsdp_resumed"]["period_log"]] == \
        [[p[k] for k in keys] for p in logs["module_fsdp"]]
    steps = {run: [r for r in read_log(out / run / "train_log.jsonl") if r["kind"] == "step"] for run in logs}
    assert [r["reduce_scatter_bytes"] for r in steps["module_fsdp"]] == [r["allreduce_bytes"] for r in steps["module_ddp"]]
    layer = sum(p.numel() for p in build_demo_model(build_demo_tokenizer(), **SMALL).model.layers[0].parameters())
    always = ranks[0]["active1"]["trainable"] - layer  # embeddings, head and final norm, as with whole layers
    assert all(always < r["allreduce_bytes"] / 4 <= always + layer for r in steps["module_ddp"])


def test_a_one_process_checkpoint_resumes_under_two_ranks_ddp_or_fsdp(ddp):
    """One process keeps the input embedding's moments for the rows that had a gradient only (row-sparse state);
    FSDP keeps dense moments, cut into each rank's shard: the compact form is expanded (untouched rows have zero
    moments, the parameter's one step count holds for every row), and both runs end as the one process did."""
    from lisa_trainer.checkpoint import read_checkpoint_state

    out, ranks = ddp
    saved = read_checkpoint_state(out / ONE_PROCESS / f"checkpoint-{ONE_PROCESS_SAVED}")["optimizer"]["state"]
    assert any("rows" in entry for entry in saved.values())  # the compact form is what is resumed from
    for run in ("ddp_from_one", "fsdp_from_one"):
        resumed = ranks[0][run]["weights"]
        for name, w in ranks[0][ONE_PROCESS]["weights"].items():  # the reduction-order tolerance of the tests above
            torch.testing.assert_close(resumed[name], w, rtol=0, atol=2e-6, msg=f"{run} {name}")
        steps = [r for r in read_log(out / run / "train_log.jsonl") if r["kind"] == "step"]
        one = [r for r in read_log(out / ONE_PROCESS / "train_log.jsonl") if r["kind"] == "step"]
        assert [r["step"] for r in steps] == list(range(ONE_PROCESS_SAVED + 1, FSDP_STEPS + 1))
        assert [r["loss"] for r in steps] == pytest.approx([r["loss"] for r in one[ONE_PROCESS_SAVED:]], rel=1e-6)
