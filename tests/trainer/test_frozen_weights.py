"""Frozen layers' weights in host memory (lisa_trainer.frozen_weights): bit-identical training, at most one offloaded
layer on the device at a time on CPU (no prefetch there), full weights in state_dict and checkpoints."""

import copy

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lisa_trainer import LisaConfig
from lisa_trainer.frozen_weights import FrozenWeightOffload
from lisa_trainer.layers import enable_gradient_checkpointing
from lisa_trainer.options import OptionError
from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")

N_LAYERS, TRAINED = 5, 2


def tiny_llama(checkpointing: bool) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=67, hidden_size=32, intermediate_size=48, num_hidden_layers=N_LAYERS,
                      num_attention_heads=4, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    if checkpointing:
        enable_gradient_checkpointing(model)
    for i, layer in enumerate(model.model.layers):
        layer.requires_grad_(i == TRAINED)
    return model.train()


def on_device(model, index: int) -> bool:
    return all(p.numel() > 0 for p in model.model.layers[index].parameters())


def offloaded_twin(model, indices):
    twin = copy.deepcopy(model)
    offload = FrozenWeightOffload(twin.model.layers)
    offload.set_offloaded(indices)
    return twin, offload


def train_side_by_side(plain, twin, offload, steps: int = 3) -> torch.Tensor:
    """AdamW steps on both models from the same batches: the same losses at every step, and between steps every
    offloaded layer back in host memory. Returns the last batch."""
    device = next(plain.parameters()).device
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, twin)]
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        ids = torch.randint(0, 67, (2, 11), generator=gen).to(device)
        losses = []
        for model, optimizer in zip((plain, twin), optimizers):
            loss = model(input_ids=ids, labels=ids).loss
            loss.backward()
            if model is twin:
                offload.release_all()
            optimizer.step()
            optimizer.zero_grad()
            losses.append(loss.item())
        assert losses[0] == losses[1]
        assert not any(on_device(twin, i) for i in offload.offloaded)
    return ids


@pytest.mark.parametrize("checkpointing", [True, False])
def test_training_is_bit_identical_and_one_offloaded_layer_computes_at_a_time(checkpointing):
    plain = tiny_llama(checkpointing)
    frozen = [i for i in range(N_LAYERS) if i != TRAINED]
    twin, offload = offloaded_twin(plain, frozen)
    assert not any(on_device(twin, i) for i in frozen)
    assert offload.offloaded_bytes() == sum(p.nbytes for i in frozen for p in plain.model.layers[i].parameters())

    resident_at_entry = []
    for module in twin.modules():  # after the offload's hooks: sees what each leaf module computes with
        module.register_forward_pre_hook(
            lambda *_: resident_at_entry.append(sum(on_device(twin, i) for i in frozen)))
    ids = train_side_by_side(plain, twin, offload)
    if checkpointing:  # forward, then recompute + backward: one offloaded layer at a time
        assert max(resident_at_entry) == 1
    else:  # without checkpointing every layer keeps its weights from its forward to its backward
        assert max(resident_at_entry) == len(frozen)
    for (name, a), b in zip(plain.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a, b), name
    with torch.no_grad():
        plain.eval(), twin.eval()
        assert torch.equal(plain(input_ids=ids).logits, twin(input_ids=ids).logits)
    offload.release_all()
    assert not any(on_device(twin, i) for i in frozen)


def test_state_dict_and_safetensors_hold_the_host_copies(tmp_path):
    from safetensors.torch import load_file, save_model

    plain = tiny_llama(True)
    twin, offload = offloaded_twin(plain, [0, 4])
    save_model(twin, str(tmp_path / "m.safetensors"))
    saved = load_file(str(tmp_path / "m.safetensors"))
    assert saved.keys() == plain.state_dict().keys()
    for name, value in plain.state_dict().items():
        assert torch.equal(saved[name], value), name


def test_leaving_the_set_brings_weights_back_and_joining_copies_current_ones():
    model = tiny_llama(True)
    offload = FrozenWeightOffload(model.model.layers)
    offload.set_offloaded([0, 1])
    with torch.no_grad():
        model.model.layers[3].mlp.up_proj.weight.add_(1.0)  # as training would change a layer before it freezes
    expected = model.model.layers[3].mlp.up_proj.weight.clone()
    offload.set_offloaded([1, 3])
    assert on_device(model, 0) and not on_device(model, 1) and not on_device(model, 3)
    assert offload.offloaded == (1, 3)
    assert torch.equal(model.state_dict()["model.layers.3.mlp.up_proj.weight"], expected)
    offload.close()
    assert all(on_device(model, i) for i in range(N_LAYERS))
    assert torch.equal(model.model.layers[3].mlp.up_proj.weight, expected)


def test_refuses_trainable_and_unknown_layers():
    model = tiny_llama(True)
    offload = FrozenWeightOffload(model.model.layers)
    with pytest.raises(ValueError, match=r"decoder layers \[2\] are trainable"):
        offload.set_offloaded([1, TRAINED])
    with pytest.raises(ValueError, match=r"no decoder layer \[9\]"):
        offload.set_offloaded([9])
    assert offload.offloaded == () and all(on_device(model, i) for i in range(N_LAYERS))


SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2)


def make_trainer(tmp_path, tok, data, offload: int, **kw):
    from lisa_trainer.demo import build_demo_model

    args = dict(output_dir=str(tmp_path), learning_rate=3e-3, max_steps=5, per_device_train_batch_size=4,
                warmup_steps=0, progress=False, save_model=False, gradient_checkpointing=True)
    args.update(kw)
    lisa = LisaConfig(n_active_layers=1, interval_steps=2, state_policy="park", offload_frozen_layers=offload)
    return LisaTrainer(build_demo_model(tok, seed=0, **SMALL), tok, data, LisaTrainingArguments(**args), lisa)


@pytest.fixture(scope="module")
def data(tok):
    from lisa_trainer.data import load_and_tokenize
    from lisa_trainer.demo import demo_dataset_path

    full = load_and_tokenize(demo_dataset_path(), tok, block_size=64)
    return type(full)(full.examples[:24], {})


def test_trainer_with_offloaded_layers_trains_as_without_across_switches_and_resume(tmp_path, tok, data):
    plain = make_trainer(tmp_path / "plain", tok, data, 0, save_steps=3)
    plain.train()
    offloaded = make_trainer(tmp_path / "off", tok, data, 2)
    crash_at = 3

    def run_until_crash(t):
        real = t.train_step

        def step():
            if t.step == crash_at:
                raise KeyboardInterrupt
            record = real()
            frozen = t.memory.offload
            assert len(frozen.offloaded) == 2 and not set(frozen.offloaded) & set(t.controller.active_layers)
            assert not any(on_device(t.model, i) for i in frozen.offloaded)  # between steps: in host memory
            return record
        t.train_step = step

    run_until_crash(offloaded)
    with pytest.raises(KeyboardInterrupt):
        offloaded.train()
    offloaded.save_checkpoint()  # at step 3, as the plain run did
    resumed = make_trainer(tmp_path / "off", tok, data, 2, save_steps=3)
    resumed.train(resume_from_checkpoint=str(tmp_path / "off" / "checkpoint-3"))
    for (name, a), b in zip(plain.model.state_dict().items(), resumed.model.state_dict().values()):
        assert torch.equal(a, b), name


def test_trainer_refuses_offload_without_gradient_checkpointing(tmp_path, tok, data):
    with pytest.raises(OptionError, match="offload_frozen_layers needs gradient checkpointing"):
        make_trainer(tmp_path, tok, data, 2, gradient_checkpointing=False)


def test_the_trainer_callback_refuses_offload():
    from lisa_trainer import LisaCallback

    with pytest.raises(OptionError, match="offload_frozen_layers is for LisaTrainer"):
        LisaCallback(offload_frozen_layers=2)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_on_a_gpu_prefetched_copies_give_the_same_training_and_free_the_weights():
    plain = tiny_llama(True).cuda()
    frozen = [i for i in range(N_LAYERS) if i != TRAINED]
    before = torch.cuda.memory_allocated()
    twin, offload = offloaded_twin(plain, frozen)
    # The caching allocator rounds every tensor up to 512 bytes.
    resident = sum(-(-p.nbytes // 512) * 512 for p in twin.parameters())
    assert torch.cuda.memory_allocated() - before == resident
    assert not any(on_device(twin, i) for i in frozen)
    train_side_by_side(plain, twin, offload)
    for (name, a), b in zip(plain.state_dict().items(), twin.state_dict().values()):
        assert torch.equal(a.cpu(), b.cpu()), name
    assert offload._host[next(iter(offload._host))].is_pinned()


def test_trainer_offload_with_the_step_inside_backward(tmp_path, tok, data):
    """Both memory options together train as neither does (clipping off, as the step inside backward needs)."""
    plain = make_trainer(tmp_path / "plain", tok, data, 0, max_grad_norm=0.0)
    both = make_trainer(tmp_path / "both", tok, data, 2, max_grad_norm=0.0, optimizer_in_backward=True)
    for _ in range(4):  # two periods
        assert plain.train_step()["loss"] == both.train_step()["loss"]
    for (name, a), b in zip(plain.model.state_dict().items(), both.model.state_dict().values()):
        assert torch.equal(a, b), name


def hooks_on(model) -> dict:
    """How many hooks of each kind every module and parameter of `model` carries."""
    kinds = ("_forward_pre_hooks", "_forward_hooks", "_backward_pre_hooks", "_backward_hooks", "_state_dict_pre_hooks",
             "_state_dict_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks")
    counts = {(name, kind): len(getattr(m, kind)) for name, m in model.named_modules() for kind in kinds}
    for name, p in model.named_parameters():
        for kind in ("_backward_hooks", "_post_accumulate_grad_hooks"):
            counts[(name, kind)] = len(getattr(p, kind) or {})
    return counts


@pytest.mark.parametrize("fails", [False, True])
def test_train_hands_back_the_model_as_it_was_given(tmp_path, tok, data, monkeypatch, fails):
    """After train(), also when a step fails inside an offloaded layer's forward: every weight on the device with
    its data, requires_grad and embedding.sparse as the user had them, no hooks left; training can go on."""
    from lisa_trainer.demo import build_demo_model

    model = build_demo_model(tok, seed=0, **SMALL)
    model.model.layers[1].mlp.requires_grad_(False)  # the user's own choice, which LISA overrides while it trains
    given_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    given_hooks = hooks_on(model)
    assert model.config.use_cache
    args = LisaTrainingArguments(output_dir=str(tmp_path), learning_rate=3e-3, max_steps=4,
                                 per_device_train_batch_size=4, progress=False, save_model=False,
                                 gradient_checkpointing=True)
    trainer = LisaTrainer(model, tok, data, args, LisaConfig(n_active_layers=1, interval_steps=2, state_policy="park",
                                                             offload_frozen_layers=2))
    embedding = model.get_input_embeddings()
    assert embedding.sparse and hooks_on(model) != given_hooks  # set up for training
    if fails:  # at step 2 (a new period), inside an offloaded layer's forward, while its weights are on the device
        for index, layer in enumerate(model.model.layers):
            def failing(*inputs, index=index, real=layer.mlp.forward):
                if trainer.step == 2 and index in trainer.memory.offload.offloaded:
                    raise RuntimeError("failed in an offloaded layer")
                return real(*inputs)
            monkeypatch.setattr(layer.mlp, "forward", failing)
        with pytest.raises(RuntimeError, match="failed in an offloaded layer"):
            trainer.train()
        monkeypatch.undo()
    else:
        trainer.train()

    assert all(p.numel() > 0 for p in model.parameters())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == given_requires_grad
    assert embedding.sparse is False
    assert hooks_on(model) == given_hooks
    assert model.config.use_cache and not any(getattr(m, "gradient_checkpointing", False) for m in model.modules())
    ids = torch.tensor([[1, 40, 41, 42, 43]])
    with torch.no_grad():
        assert torch.equal(copy.deepcopy(model)(input_ids=ids).logits, model(input_ids=ids).logits)

    if fails:  # the same trainer goes on from step 2 as a run that never failed
        while trainer.step < 4:
            trainer.train_step()
            assert len(trainer.memory.offload.offloaded) == 2 and embedding.sparse
        whole = make_trainer(tmp_path / "whole", tok, data, 0, max_steps=4)
        whole.train()
        for (name, a), b in zip(whole.model.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), name
