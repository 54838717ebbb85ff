"""LisaCallback in Hugging Face Trainer and TRL SFTTrainer under torchrun, 2 gloo ranks, with no flag from the user:
every gradient-checkpointing and ddp_find_unused_parameters setting trains (or, where the user asked DDP to reduce
the whole model, fails at train start naming the setting), the ranks end identical, every sampled layer trains, only
the trainable set is all-reduced (`lisa/allreduce_bytes` in the Trainer's logs), and a checkpoint resumes the same
schedule. All runs share one torchrun launch (tests/trainer/callback_ddp_runs.py).
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from ranks import free_port

WORLD = 2
TRAINS = ["plain", "plain_find_unused_false", "checkpointing", "checkpointing_find_unused_true", "reentrant",
          "reentrant_find_unused_true", "parked_trainer_optimizer", "optimizer_for", "ddp_whole_model",
          "added_later_find_unused_true", "saved", "sft", "sft_find_unused_false"]
WHOLE_MODEL = {"ddp_whole_model", "added_later_find_unused_true"}  # DDP reduces every parameter there


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("callback_ddp")
    root = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # FusedAdamW's PyTorch path on CPU
    paths = [root, root / "python_api", root / "tests" / "helpers", Path(__file__).parent]  # the runs import test_callback
    env.update(PYTHONPATH=os.pathsep.join(map(str, paths)), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD),
           "--master_port", str(free_port()),
           str(Path(__file__).with_name("callback_ddp_runs.py")), str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _trained(ranks, name):
    for r in range(WORLD):
        assert "error" not in ranks[r][name], ranks[r][name].get("traceback")
    return ranks[0][name], ranks[1][name]


@pytest.mark.parametrize("name", TRAINS)
def test_every_setting_trains_every_sampled_layer_and_ranks_agree(runs, name):
    run, other = _trained(runs, name)
    assert run["steps"] == 6 and run["frozen_layer_failures"] == []  # frozen layers never moved in a step
    for key, w in run["weights"].items():
        assert torch.equal(w, other["weights"][key]), key
    assert run["period_log"] == other["period_log"]
    assert [e["period"] for e in run["period_log"]] == [0, 1, 2] and not any(e["partial"] for e in run["period_log"])
    sampled = {i for e in run["period_log"] for i in e["layers"]}
    assert len(sampled) > 1 and all(n > 0 for e in run["period_log"] for n in e["layer_update_norms"])
    for key, w in run["weights"].items():
        layer = int(key.split(".")[2]) if key.startswith("model.layers.") else None
        assert torch.equal(w, run["initial"][key]) == (layer is not None and layer not in sampled), key


def test_sft_trainer_trains_with_its_default_gradient_checkpointing(runs):
    assert runs[0]["sft"]["gradient_checkpointing"] is True


@pytest.mark.parametrize("name", TRAINS)
def test_allreduce_bytes_in_the_trainer_logs_are_the_active_sets(runs, name):
    run, _ = _trained(runs, name)
    logged = [h["lisa/allreduce_bytes"] for h in run["log_history"] if "loss" in h]
    assert len(logged) == 6
    whole = sum(w.numel() * w.element_size() for w in run["weights"].values())
    expected = whole if name in WHOLE_MODEL else run["active_set_bytes"]
    assert set(logged) == {expected}
    if name not in WHOLE_MODEL:
        assert expected < 0.6 * whole  # one of the four layers trains; the rest costs no communication


def test_optimizer_for_keeps_row_sparse_bf16_embedding_state_under_ddp(runs):
    """The all-reduced gradient is dense, but only the rows of the tokens either rank saw are nonzero: the input
    embedding's moments stay row-sparse (the data uses 61 of the 64 token ids), and both ranks step the same rows."""
    run, other = _trained(runs, "optimizer_for")
    vocab = run["weights"]["model.embed_tokens.weight"].shape[0]
    dtype, rows = run["embedding_state"]["input"]
    assert dtype == torch.bfloat16 and rows is not None and 0 < rows < vocab
    assert run["embedding_state"]["head"] == (torch.bfloat16, None)
    assert other["embedding_state"] == run["embedding_state"]
    plain, _ = _trained(runs, "plain")
    assert plain["embedding_state"]["input"] == (torch.float32, None)  # the Trainer's AdamW: dense, fp32


@pytest.mark.parametrize("name", ["optimizer_for", "parked_trainer_optimizer"])
def test_each_rank_parks_the_frozen_layers_state(runs, name):
    for r in range(WORLD):
        assert _trained(runs, name)[r]["parked_bytes"] > 0


def test_allreduce_bytes_reach_the_trainers_reporting(runs):
    """TensorBoard (report_to), which the Trainer calls before the user's callbacks, gets lisa/allreduce_bytes."""
    run, _ = _trained(runs, "plain")
    assert run["tensorboard"]["train/lisa/allreduce_bytes"] == [run["active_set_bytes"]] * 6


def test_lisa_sync_gives_the_weights_of_ddp_over_the_whole_model(runs):
    """The same division by the ranks before the same sum: bit-identical to DDP reducing every parameter."""
    ours, _ = _trained(runs, "plain")
    ddp, _ = _trained(runs, "ddp_whole_model")
    for key, w in ours["weights"].items():
        assert torch.equal(w, ddp["weights"][key]), key


@pytest.mark.parametrize("name, problem", [
    ("ddp_whole_model_checkpointing", "LisaCallback(gradient_sync='ddp') leaves the whole model to the Trainer's DDP"
                                      "; with ddp_find_unused_parameters unset, which the Trainer turns to False with "
                                      "gradient checkpointing, DDP would wait"),
    ("added_later", "LisaCallback was added after the Trainer was built (trainer.add_callback)"),
])
def test_a_setting_ddp_cannot_train_is_refused_at_train_start(runs, name, problem):
    for r in range(WORLD):
        error = runs[r][name]["error"]
        assert error.startswith(f"ValueError: {problem}"), error
        assert "Fix: " in error and "set TrainingArguments(ddp_find_unused_parameters=True)" in error, error
        trace = runs[r][name]["traceback"]
        assert "in on_train_begin" in trace and "training_step" not in trace  # before any step


@pytest.mark.parametrize("name", ["fsdp2_optimizer_for_park", "fsdp2_adamw_keep"])
def test_fsdp2_sharded_layers_freeze_and_park_each_ranks_shards(runs, name):
    """On FSDP2 shards: only the active layers get gradients (a frozen layer gets no reduce-scatter), no DDP
    machinery, and with FusedAdamW each rank parks its own half of a frozen layer's moments."""
    for r in range(WORLD):
        run = runs[r][name]
        assert "error" not in run, run.get("traceback")
        assert all(with_grads == active for with_grads, active in run["layers_with_gradients"])
        assert [e["layers"] for e in run["period_log"]] == [e["layers"] for e in runs[0]["plain"]["period_log"]]
        assert run["data_parallel"] is None
    parked = [runs[r]["fsdp2_optimizer_for_park"]["parked"] for r in range(WORLD)]
    assert parked[0] and parked[0].keys() == parked[1].keys()
    for param, (in_bank, local, whole) in parked[0].items():
        assert in_bank == 2 * local and local < whole and local + parked[1][param][1] == whole, param


def test_ranks_sampling_other_layers_stop_at_the_first_step_naming_both(runs):
    for r in range(WORLD):
        error = runs[r]["mismatched_seeds"]["error"]
        assert error.startswith("DistributedError: LISA schedule differs between ranks: rank 0 trains layers"), error
        assert "rank 1 trains [" in error and "(settings [0, 1, 2])" in error  # period, seed, interval
        module_error = runs[r]["mismatched_module_seeds"]["error"]  # module-wise: modules compared, and named
        assert module_error.startswith("DistributedError: LISA schedule differs between ranks: rank 0 trains modules"), \
            module_error


def test_resumed_two_rank_checkpoint_continues_the_schedule(runs):
    whole, _ = _trained(runs, "saved")
    resumed, other = _trained(runs, "resumed")
    for key, w in whole["weights"].items():
        assert torch.equal(resumed["weights"][key], w) and torch.equal(other["weights"][key], w), key
    assert resumed["period_log"] == whole["period_log"]


@pytest.mark.parametrize("sharding, policy, optim, problem", [
    ("fsdp1", "keep", "adamw_torch", r"LisaCallback needs FSDP2, but the Trainer shards with FSDP1.* Fix: set "
                                     r"fsdp_version: 2 in the accelerate config file"),
    ("fsdp2", "park", "adamw_torch", r"parks sharded optimizer state with FusedAdamW only, not the Trainer's AdamW\. "
                                     r"Fix: Trainer\(optimizers=\(LisaCallback.optimizer_for"),
])
def test_fsdp_the_callback_cannot_serve_is_refused_at_train_start(tmp_path, monkeypatch, sharding, policy, optim,
                                                                    problem):
    """What the Trainer's accelerator reports under an FSDP config (accelerate enables FSDP on GPUs only)."""
    from transformers import TrainerControl, TrainerState

    import lisa_trainer.callback
    from lisa_trainer import LisaCallback
    from test_callback import tiny_llama, training_args

    monkeypatch.setattr(lisa_trainer.callback, "_trainer_sharding", lambda args: sharding)
    model = tiny_llama()
    lisa = LisaCallback(n_active_layers=1, interval_steps=2, state_policy=policy)
    with pytest.raises(ValueError, match=problem):
        lisa.on_train_begin(training_args(tmp_path), TrainerState(), TrainerControl(), model=model,
                            optimizer=torch.optim.AdamW(model.parameters()))


def test_ddp_without_an_always_trainable_module_is_refused_when_the_trainer_is_built(tmp_path, monkeypatch):
    """DDP keeps one parameter that has a gradient in every step: with nothing always trainable there is none."""
    from transformers import TrainerControl, TrainerState

    import lisa_trainer.callback
    from lisa_trainer import LisaCallback
    from test_callback import tiny_llama, training_args

    monkeypatch.setattr(lisa_trainer.callback, "_trainer_sharding", lambda args: "ddp")
    lisa = LisaCallback(n_active_layers=1, always_trainable=())
    with pytest.raises(ValueError, match=r"LisaConfig.always_trainable is empty, but under DDP LisaCallback needs"):
        lisa.on_init_end(training_args(tmp_path), TrainerState(), TrainerControl(), model=tiny_llama())
