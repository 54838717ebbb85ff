import math

import pytest
import torch

from lisa_trainer import LisaConfig
from lisa_trainer.data import load_and_tokenize, split_dataset
from lisa_trainer.demo import build_demo_model, demo_dataset_path
from lisa_trainer.runlog import read_log
from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments, lr_at

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


@pytest.fixture(scope="module")
def data(tok):
    return load_and_tokenize(demo_dataset_path(), tok, block_size=64)


def make_trainer(tmp_path, tok, train, *, eval_data=None, model_kw=SMALL, lisa=None, **kw):
    args = dict(output_dir=str(tmp_path), learning_rate=3e-3, max_steps=6, per_device_train_batch_size=4,
                warmup_steps=0, progress=False, save_model=False)
    args.update(kw)
    lisa = lisa or LisaConfig(n_active_layers=2, interval_steps=3, state_policy="keep")
    model = build_demo_model(tok, seed=0, **model_kw)
    return LisaTrainer(model, tok, train, LisaTrainingArguments(**args), lisa, eval_dataset=eval_data)


def test_loss_falls_on_the_demo(tmp_path, tok, data):
    train, held = split_dataset(data, 0.1, seed=0)
    t = make_trainer(tmp_path, tok, train, eval_data=held, model_kw={}, max_steps=14, eval_steps=7,
                     lisa=LisaConfig(n_active_layers=2, interval_steps=5, state_policy="keep"))
    summary = t.train()
    assert summary["last_loss"] < summary["first_loss"] - 1.0, summary  # from ln(259) = 5.56 toward ~3.5
    assert summary["last_eval_loss"] < summary["first_eval_loss"] - 1.0, summary


def test_log_has_steps_periods_and_evals(tmp_path, tok, data):
    train, held = split_dataset(data, 0.1, seed=0)
    t = make_trainer(tmp_path, tok, train, eval_data=held, max_steps=7, eval_steps=3)
    summary = t.train()
    recs = read_log(tmp_path / "train_log.jsonl")
    steps = [r for r in recs if r["kind"] == "step"]
    assert [r["step"] for r in steps] == list(range(1, 8))
    for r in steps:
        assert {"loss", "lr", "grad_norm", "active_layers", "tokens", "tokens_per_s"} <= r.keys()
        assert len(r["active_layers"]) == 2 and math.isfinite(r["loss"]) and r["tokens_per_s"] > 0
    assert [r["active_layers"] for r in steps[:3]] == [steps[0]["active_layers"]] * 3  # one period = 3 steps
    periods = [r for r in recs if r["kind"] == "period"]
    assert [p["period"] for p in periods] == [0, 1, 2]  # the last, one-step period is closed by finish()
    for p in periods:
        norms = p["update_norms"]
        assert all(str(i) in norms for i in p["layers"]) and all(v > 0 for v in norms.values())
        assert any(not k.isdigit() for k in norms)  # embeddings/head/final norm are tracked too
    assert [r["step"] for r in recs if r["kind"] == "eval"] == [0, 3, 6, 7]
    assert recs[0]["kind"] == "config" and recs[-1]["kind"] == "summary" and summary["steps"] == 7


def test_gradient_accumulation_weights_every_token_equally(tmp_path, tok, data):
    """batch 4 x 1 micro-batch == batch 2 x 2 micro-batches: same loss, same gradient (token-weighted mean).

    The gradients are compared as the optimizer receives them, not the weights after its step: Adam's first step
    moves a weight by ~lr * sign(grad), so a component whose gradient is near eps flips with fp32 rounding alone."""
    train = type(data)(data.examples[:16], {})
    a = make_trainer(tmp_path / "a", tok, train, per_device_train_batch_size=4, gradient_accumulation_steps=1, max_steps=2)
    b = make_trainer(tmp_path / "b", tok, train, per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=2)
    b._order = a._order  # same example order; only the split into micro-batches differs
    grads = {}

    def record_first_gradients(opt, args, kwargs):
        grads.setdefault(opt, [p.grad.clone().to_dense()  # the input embedding's gradient is sparse
                               for group in opt.param_groups for p in group["params"] if p.grad is not None])

    for t in (a, b):
        t.optimizer.register_step_pre_hook(record_first_gradients)
    for _ in range(2):
        ra, rb = a.train_step(), b.train_step()
        assert ra["loss"] == pytest.approx(rb["loss"], rel=1e-5)
    grads_a, grads_b = grads[a.optimizer], grads[b.optimizer]
    assert len(grads_a) == len(grads_b) > 0
    for ga, gb in zip(grads_a, grads_b):  # the first step's: both models start from the same weights
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6 * float(ga.abs().max()))


def test_gradient_checkpointing_gives_the_same_training(tmp_path, tok, data):
    a = make_trainer(tmp_path / "a", tok, data, max_steps=2)
    b = make_trainer(tmp_path / "b", tok, data, max_steps=2, gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in b.model.modules())
    for _ in range(2):
        assert a.train_step()["loss"] == pytest.approx(b.train_step()["loss"], rel=1e-6)


def test_only_sampled_layers_and_always_on_modules_change(tmp_path, tok, data):
    t = make_trainer(tmp_path, tok, data, max_steps=3)
    before = {n: p.detach().clone() for n, p in t.model.named_parameters()}
    for _ in range(3):  # exactly one period
        t.train_step()
    active = set(t.controller.active_layers)
    for n, p in t.model.named_parameters():
        changed = not torch.equal(before[n], p)
        if n.startswith("model.layers."):
            assert changed == (int(n.split(".")[2]) in active), n
        else:
            assert changed, n  # embeddings, final norm, head


def test_lr_schedule_warmup_then_decay():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10)
    assert [lr_at(s, kind="cosine", **kw) for s in (0, 4, 9)] == pytest.approx([0.1, 0.5, 1.0])
    assert lr_at(10, kind="cosine", **kw) == pytest.approx(1.0)
    assert lr_at(60, kind="cosine", **kw) == pytest.approx(0.5)
    assert lr_at(60, kind="linear", **kw) == pytest.approx(0.5)
    assert lr_at(109, kind="linear", **kw) == pytest.approx(0.01)
    assert lr_at(80, kind="constant", **kw) == 1.0
    cos = [lr_at(s, kind="cosine", **kw) for s in range(10, 110)]
    assert all(x >= y for x, y in zip(cos, cos[1:]))


def test_training_arguments_are_validated():
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        LisaTrainingArguments(output_dir="x", gradient_accumulation_steps=0)
    with pytest.raises(ValueError, match="lr_scheduler_type"):
        LisaTrainingArguments(output_dir="x", lr_scheduler_type="step")


def test_epochs_set_the_step_count(tmp_path, tok, data):
    t = make_trainer(tmp_path, tok, data, max_steps=-1, num_train_epochs=2.0, per_device_train_batch_size=8,
                     gradient_accumulation_steps=2)
    assert t.max_steps == math.ceil(math.ceil(len(data) / 8) * 2 / 2)


def test_a_peft_model_is_refused(tmp_path, tok, data):
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(build_demo_model(tok, seed=0, **SMALL), peft.LoraConfig(r=4, target_modules=["q_proj"]))
    args = LisaTrainingArguments(output_dir=str(tmp_path), max_steps=1, progress=False)
    with pytest.raises(ValueError, match=r"PeftModel is a peft model .*merge_and_unload\(\)"):
        LisaTrainer(model, tok, data, args, LisaConfig(n_active_layers=1))
