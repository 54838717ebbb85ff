"""The trainer's chunked LM-head loss: the same training as the plain loss, a stated fallback where it cannot apply."""

import pytest
import torch
import torch.nn.functional as F

from lisa_trainer.cli import parse_options
from lisa_trainer import LisaConfig
from lisa_trainer.data import IGNORE_INDEX, load_and_tokenize, split_dataset
from lisa_trainer.demo import build_demo_model, demo_dataset_path
from lisa_trainer.loss import ChunkedCausalLMLoss
from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments

SMALL = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


@pytest.fixture(scope="module")
def data(tok):
    return load_and_tokenize(demo_dataset_path(), tok, block_size=48)


def run(tmp_path, tok, data, *, chunked_loss, tie, steps=3):
    train, held = split_dataset(data, 0.1, seed=0)
    model = build_demo_model(tok, seed=0, tie_word_embeddings=tie, **SMALL)
    args = LisaTrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, max_steps=steps,
                             per_device_train_batch_size=4, gradient_accumulation_steps=2, progress=False,
                             save_model=False, chunked_loss=chunked_loss)
    trainer = LisaTrainer(model, tok, train, args, LisaConfig(n_active_layers=1, interval_steps=2, state_policy="keep"),
                          eval_dataset=held)
    losses = [trainer.train_step()["loss"] for _ in range(steps)]
    return trainer, losses, trainer.evaluate()


@pytest.mark.parametrize("tie", [False, True], ids=["separate head", "tied head"])
def test_switch_on_and_off_train_the_same(tmp_path, tok, data, tie):
    chunked, losses, eval_loss = run(tmp_path / "on", tok, data, chunked_loss=True, tie=tie)
    plain, plain_losses, plain_eval = run(tmp_path / "off", tok, data, chunked_loss=False, tie=tie)
    assert chunked.memory.chunked_loss.reason is None and plain.memory.chunked_loss is None
    assert losses == pytest.approx(plain_losses, rel=1e-5)
    assert eval_loss == pytest.approx(plain_eval, rel=1e-5)
    assert (chunked.model.get_output_embeddings().weight is chunked.model.get_input_embeddings().weight) == tie
    for (name, p), q in zip(chunked.model.named_parameters(), plain.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=name)


def tiny_batch(vocab, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (2, 10), generator=gen)
    mask = torch.ones_like(ids)
    mask[1, -3:] = 0
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def plain_loss_sum(model, batch):
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def test_gemma2_soft_capped_logits():
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    cfg = Gemma2Config(vocab_size=89, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=16, final_logit_softcapping=2.0)
    model = Gemma2ForCausalLM(cfg).eval()  # no dropout, so the two losses see the same network
    with torch.no_grad():
        model.lm_head.weight.mul_(100)  # logits of a few units, where a cap of 2 bites (random init gives ~0.01)
    batch = tiny_batch(89)
    loss_fn = ChunkedCausalLMLoss(model)
    grads = []
    for compute in (loss_fn, lambda b: plain_loss_sum(model, b)):
        model.zero_grad(set_to_none=True)
        loss = compute(batch)
        loss.backward()
        grads.append((loss.detach(), model.get_output_embeddings().weight.grad.clone()))
    assert loss_fn.reason is None
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-6, atol=0)
    scale = float(grads[1][1].abs().max())  # the tied weight's gradient sums large terms of both signs
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-6 * scale)
    # The soft-cap matters at this size: without it the loss would differ.
    with torch.no_grad():
        uncapped = F.cross_entropy(F.linear(model.model(input_ids=batch["input_ids"][:1]).last_hidden_state[0, :-1],
                                            model.lm_head.weight), batch["input_ids"][0, 1:], reduction="sum")
        capped = loss_fn({k: v[:1] for k, v in batch.items()})
    assert abs(float(uncapped) - float(capped)) > 1.0


def test_logits_scaled_after_the_head_fall_back_with_the_reason():
    from transformers import CohereConfig, CohereForCausalLM

    torch.manual_seed(0)
    cfg = CohereConfig(vocab_size=83, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, logit_scale=0.25)
    model = CohereForCausalLM(cfg)
    loss_fn = ChunkedCausalLMLoss(model)
    with pytest.warns(UserWarning, match="chunked_loss: using the plain loss .* transforms its logits after the head"):
        assert loss_fn(tiny_batch(83)) is None
    assert "transforms its logits" in loss_fn.reason and model.training  # the probe restored train mode


def test_model_without_a_linear_head_is_refused_at_once():
    class LogitsOnly(torch.nn.Module):
        def forward(self, input_ids, attention_mask):
            raise AssertionError("not called")

    with pytest.warns(UserWarning, match="LogitsOnly has no nn.Linear output embedding"):
        loss_fn = ChunkedCausalLMLoss(LogitsOnly())
    assert loss_fn(tiny_batch(5)) is None


@pytest.mark.parametrize("flags, expected", [([], True), (["--chunked_loss", "0"], False), (["--chunked_loss"], True)])
def test_cli_switch(flags, expected):
    assert parse_options(["--demo", *flags]).training.chunked_loss is expected
