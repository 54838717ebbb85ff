import pickle
import random

import pytest
import torch
from crash import crash_after

from lisa_kernels import StateParker
from lisa_trainer.checkpoint import (
    STATE_FILE,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    prune_checkpoints,
    read_checkpoint_state,
    restore_rng_state,
)
from lisa_trainer import LisaConfig
from lisa_trainer.data import load_and_tokenize
from lisa_trainer.demo import build_demo_model, demo_dataset_path
from lisa_trainer.runlog import read_log
from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


@pytest.fixture(scope="module")
def data(tok):
    return load_and_tokenize(demo_dataset_path(), tok, block_size=48)


def trainer(out, tok, data, policy, **kw):
    args = LisaTrainingArguments(output_dir=str(out), learning_rate=3e-3, max_steps=8, per_device_train_batch_size=3,
                             gradient_accumulation_steps=2, warmup_steps=2, progress=False, save_model=False, seed=5, **kw)
    lisa = LisaConfig(n_active_layers=2, interval_steps=3, seed=11, state_policy=policy)
    return LisaTrainer(build_demo_model(tok, seed=1, **SMALL), tok, data, args, lisa)


def steps_of(out):
    return [(r["step"], r["loss"], r["lr"], r["active_layers"]) for r in read_log(out / "train_log.jsonl") if r["kind"] == "step"]


@pytest.mark.parametrize("policy", ["park", "reset", "keep"])
def test_resumed_run_equals_uninterrupted(tmp_path, tok, data, policy):
    """Interrupt mid-period (step 4 of periods of 3), resume: same layers, bit-identical losses and weights."""
    full = trainer(tmp_path / "full", tok, data, policy, save_steps=4)
    full.train()
    assert [p.name for p in list_checkpoints(tmp_path / "full")] == ["checkpoint-4", "checkpoint-8"]

    crash_after(trainer(tmp_path / "part", tok, data, policy, save_steps=4), 5)
    assert [s[0] for s in steps_of(tmp_path / "part")] == [1, 2, 3, 4, 5]
    resumed = trainer(tmp_path / "part", tok, data, policy, save_steps=4)
    resumed.train(resume_from_checkpoint="latest")

    expected, got = steps_of(tmp_path / "full"), steps_of(tmp_path / "part")
    assert [s[0] for s in got] == list(range(1, 9))  # the log continues without duplicates
    assert got == expected  # exact equality: losses, lrs and active layers
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        for name in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[k][name], sb[k][name]), (k, name)


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "adafactor"])
def test_every_parking_optimizer_resumes_exactly(tmp_path, tok, data, optim):
    """The --optim choices beside adamw_lisa, with parked state: the checkpoint at step 4 holds the state of layers
    period 0 trained and period 1 froze; the resumed run loads it straight into the bank and ends bit-identical."""
    full = trainer(tmp_path / "full", tok, data, "park", save_steps=4, optim=optim)
    full.train()
    crash_after(trainer(tmp_path / "part", tok, data, "park", save_steps=4, optim=optim), 5)
    resumed = trainer(tmp_path / "part", tok, data, "park", save_steps=4, optim=optim)
    resumed.resume(tmp_path / "part" / "checkpoint-4")
    parker = StateParker.of(resumed.optimizer)
    assert parker.parked_params and not any(p.requires_grad for p in parker.parked_params)
    resumed.train(resume_from_checkpoint="latest")

    assert steps_of(tmp_path / "part") == steps_of(tmp_path / "full")
    for (n, a), b in zip(full.model.named_parameters(), resumed.model.parameters()):
        assert torch.equal(a, b), n
    sa, sb = full.optimizer.state_dict()["state"], resumed.optimizer.state_dict()["state"]
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].keys() == sb[k].keys(), k
        for name, value in sa[k].items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(sb[k][name])), (k, name)


def test_checkpoint_contents_load_weights_only(tmp_path, tok, data):
    t = trainer(tmp_path, tok, data, "keep")
    for _ in range(2):
        t.train_step()
    t.save_checkpoint()
    ckpt = latest_checkpoint(tmp_path)
    payload = torch.load(ckpt / STATE_FILE, weights_only=True)
    assert payload["trainer"]["step"] == 2
    assert payload["controller"]["active_layers"] == list(t.controller.active_layers)
    assert payload["optimizer"]["state"]  # moments of the trained parameters
    assert {"torch", "python"} <= payload["rng"].keys()
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(ckpt)  # a checkpoint is also a Hugging Face model folder
    for (n, a), b in zip(t.model.named_parameters(), loaded.parameters()):
        assert torch.equal(a.cpu(), b), n


class _Evil:
    def __reduce__(self):
        return (print, ("this would have run",))


def test_a_checkpoint_with_pickled_objects_is_refused(tmp_path):
    (tmp_path / "checkpoint-1").mkdir()
    torch.save({"format_version": 1, "trainer": _Evil()}, tmp_path / "checkpoint-1" / STATE_FILE)
    with pytest.raises(pickle.UnpicklingError):
        read_checkpoint_state(tmp_path / "checkpoint-1")


def test_interrupted_save_leaves_no_checkpoint(tmp_path, tok, data, monkeypatch):
    t = trainer(tmp_path, tok, data, "keep")
    t.train_step()

    def crash(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        t.save_checkpoint()
    assert latest_checkpoint(tmp_path) is None
    assert [p.name for p in tmp_path.iterdir() if "checkpoint" in p.name] == []  # temporary folder removed too


def test_rng_states_round_trip():
    state = capture_rng_state()
    a = (torch.rand(3), random.random())
    restore_rng_state(state)
    b = (torch.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    try:
        import numpy as np
    except ImportError:
        return
    state = capture_rng_state()
    x = np.random.rand(2)
    restore_rng_state(state)
    assert (np.random.rand(2) == x).all()


def test_latest_ignores_partial_folders_and_prune_keeps_newest(tmp_path):
    for step in (2, 10, 4):
        (tmp_path / f"checkpoint-{step}").mkdir()
        (tmp_path / f"checkpoint-{step}" / STATE_FILE).write_bytes(b"")
    (tmp_path / "checkpoint-20").mkdir()  # no state file: an incomplete copy
    (tmp_path / ".checkpoint-30.tmp-1").mkdir()
    assert latest_checkpoint(tmp_path).name == "checkpoint-10"
    prune_checkpoints(tmp_path, keep=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-10"]
