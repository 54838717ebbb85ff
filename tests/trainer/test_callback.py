"""LisaCallback inside a real transformers.Trainer run (CPU, tiny random Llama, in-memory data)."""

import warnings

import pytest
import torch
import transformers
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from lisa_kernels import FusedAdamW
from lisa_trainer import LisaCallback, LisaConfig

N_LAYERS = 4


pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=32, length=8):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(3, 64, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(config)


def training_args(tmp_path, **overrides):
    kwargs = dict(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                  learning_rate=1e-2, weight_decay=0.1, lr_scheduler_type="constant", report_to=[], use_cpu=True,
                  save_strategy="no", logging_strategy="no", dataloader_num_workers=0, disable_tqdm=True, seed=0)
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)


def layer_of(name):
    prefix = "model.layers."
    return int(name[len(prefix):].split(".")[0]) if name.startswith(prefix) else None


def layers_with_state_on_device(lisa, model=None, optimizer=None):
    """Decoder layers with optimizer state tensors in `optimizer.state` (neither parked nor dropped)."""
    model = model or lisa.controller.model
    opt = getattr(optimizer, "optimizer", optimizer) or lisa.controller._opt  # unwrap accelerate's wrapper
    return {i for i, layer in enumerate(model.model.layers) for p in layer.parameters()
            if any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in opt.state.get(p, {}).values())}


class _FrozenLayersStayPut(TrainerCallback):
    """Checks, around every optimizer step, that only the active layers and the always-on modules changed."""

    def __init__(self, lisa):
        self.lisa, self.before, self.steps, self.failures = lisa, None, 0, []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.before = {n: p.detach().clone() for n, p in model.named_parameters()}

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps += 1
        active = set(self.lisa.controller.active_layers)
        for name, p in model.named_parameters():
            layer = layer_of(name)
            changed = not torch.equal(p, self.before[name])
            if changed != (layer is None or layer in active):
                self.failures.append((state.global_step, name, sorted(active), changed))


def run_trainer(tmp_path, lisa, optimizer="fused", **overrides):
    model = tiny_llama()
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = training_args(tmp_path, **overrides)
    checker = _FrozenLayersStayPut(lisa)
    # The two lines an existing Trainer script gains: the callback and the optimizer.
    optimizers = (LisaCallback.optimizer_for(model, args), None) if optimizer == "fused" else (None, None)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[lisa, checker],
                      optimizers=optimizers)
    trainer.train()
    return model, initial, checker, trainer


def check_lisa_run(model, initial, checker, lisa):
    assert checker.steps == 12 and checker.failures == []
    log = lisa.controller.period_log
    assert [e["period"] for e in log] == list(range(6)) and not any(e["partial"] for e in log)
    assert len({tuple(e["layers"]) for e in log}) > 1, "layers never switched"
    trained = {i for e in log for i in e["layers"]}
    assert trained == set(range(N_LAYERS))
    for name, p in model.named_parameters():
        assert not torch.equal(p, initial[name]), f"{name} never trained"
    assert all(n > 0 for e in log for n in e["layer_update_norms"])


@pytest.mark.parametrize("policy", ["reset", "keep"])
def test_trainer_with_lisa_callback_and_fused_adamw(tmp_path, policy):
    lisa = LisaCallback(n_active_layers=1, interval_steps=2, seed=3, state_policy=policy)
    model, initial, checker, trainer = run_trainer(tmp_path, lisa)
    assert isinstance(trainer.optimizer.optimizer if hasattr(trainer.optimizer, "optimizer") else trainer.optimizer,
                      FusedAdamW)
    check_lisa_run(model, initial, checker, lisa)


def test_trainer_with_parked_state(tmp_path):
    lisa = LisaCallback(LisaConfig(n_active_layers=1, interval_steps=2, seed=3))  # default policy: park
    model, initial, checker, trainer = run_trainer(tmp_path, lisa)
    check_lisa_run(model, initial, checker, lisa)
    assert layers_with_state_on_device(lisa) == set(lisa.controller.active_layers)
    assert all(p.requires_grad for p in model.parameters())  # after training, as before it


@pytest.mark.parametrize("optim", ["adamw_torch", "adamw_torch_fused", "adafactor"])
def test_trainer_own_optimizer_parks_and_equals_keep(tmp_path, optim):
    # The two-line form: no optimizers=. Trainer builds its optimizer before on_train_begin, i.e. before LISA
    # freezes anything, so every layer is in it; the callback attaches a StateParker to it.
    finals = {}
    for policy in ("keep", "park"):
        lisa = LisaCallback(n_active_layers=1, interval_steps=2, seed=3, state_policy=policy)
        model, initial, checker, trainer = run_trainer(tmp_path / policy, lisa, optimizer="trainer", optim=optim)
        check_lisa_run(model, initial, checker, lisa)
        finals[policy] = {n: p.detach().clone() for n, p in model.named_parameters()}
        if policy == "park":
            assert layers_with_state_on_device(lisa) == set(lisa.controller.active_layers)
            assert lisa.controller.parker.bank.bytes_held > 0
        else:
            assert layers_with_state_on_device(lisa) == set(range(N_LAYERS))
    assert all(torch.equal(finals["park"][n], finals["keep"][n]) for n in finals["keep"])


class _StateAtTrainBegin(TrainerCallback):
    """Records which layers' optimizer state is on the device when training begins: after a resume's load, before
    LisaCallback (listed after this one) parks anything."""

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.layers = layers_with_state_on_device(None, model, optimizer)


@pytest.mark.parametrize("optimizer, optim, restore_flag", [
    ("trainer", "adamw_torch", False), ("fused", "adamw_torch_fused", False), ("trainer", "adafactor", True),
])
def test_trainer_resume_is_bit_identical_and_keeps_the_period_log(tmp_path, optimizer, optim, restore_flag):
    # restore_callback_states_from_checkpoint=True makes the Trainer rebuild the callback from its saved state.
    def run(out, resume=None):
        model = tiny_llama()
        at_begin = _StateAtTrainBegin()
        args = training_args(out, save_strategy="steps", save_steps=6, optim=optim,
                             restore_callback_states_from_checkpoint=restore_flag)
        optimizers = (LisaCallback.optimizer_for(model, args), None) if optimizer == "fused" else (None, None)
        trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), optimizers=optimizers,
                          callbacks=[at_begin, LisaCallback(n_active_layers=1, interval_steps=2, seed=3)])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # optim= set beside optimizers=: tested elsewhere
            trainer.train(resume_from_checkpoint=resume)
        lisa = next(cb for cb in trainer.callback_handler.callbacks if isinstance(cb, LisaCallback))
        return model, lisa, at_begin

    whole, whole_lisa, _ = run(tmp_path / "whole")
    resumed, resumed_lisa, at_begin = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-6"))
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), whole.parameters()))
    assert resumed_lisa.controller.period_log == whole_lisa.controller.period_log
    assert [e["period"] for e in resumed_lisa.controller.period_log] == list(range(6))
    if optimizer == "fused":  # its parker loaded every layer's state into host memory, none onto the device
        assert at_begin.layers == set()
    else:  # the Trainer loaded its own optimizer's state (every layer trained so far) before any callback ran
        assert at_begin.layers == {i for e in whole_lisa.controller.period_log[:3] for i in e["layers"]}


def test_optimizers_argument_overriding_optim_is_said_once(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path, optim="adafactor")
    lisa = LisaCallback(n_active_layers=1, interval_steps=2)
    with pytest.warns(UserWarning, match=r"optim='adafactor'\) is not used: Trainer\(optimizers=...\) supplies "
                                         r"FusedAdamW") as caught:
        Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[lisa],
                optimizers=(LisaCallback.optimizer_for(model, args), None))
    assert sum("is not used" in str(w.message) for w in caught) == 1


def test_optimizer_that_flattens_parameters_is_refused_in_trainer_terms(tmp_path):
    model = tiny_llama()
    flat = torch.nn.Parameter(torch.cat([p.detach().reshape(-1) for p in model.parameters()]))
    lisa = LisaCallback(n_active_layers=1, interval_steps=2)
    trainer = Trainer(model=model, args=training_args(tmp_path), train_dataset=_Tokens(), callbacks=[lisa],
                      optimizers=(torch.optim.AdamW([flat]), None))
    with pytest.raises(ValueError, match=r"Trainer's optimizer \(AdamW\) does not hold .* TrainingArguments\("
                                         r"optim='adamw_torch'\).*LisaCallback.optimizer_for"):
        trainer.train()


def test_optimizer_for_uses_training_arguments(tmp_path):
    model = tiny_llama()
    args = training_args(tmp_path, learning_rate=3e-4, weight_decay=0.05, adam_beta1=0.8, adam_epsilon=1e-6)
    opt = LisaCallback.optimizer_for(model, args, lr=1e-3)  # keywords override the arguments
    assert isinstance(opt, FusedAdamW)
    assert {id(p) for g in opt.param_groups for p in g["params"]} == {id(p) for p in model.parameters()}
    group = opt.param_groups[0]
    assert (group["lr"], group["weight_decay"], group["betas"], group["eps"]) == (1e-3, 0.05, (0.8, 0.999), 1e-6)
    trainer = Trainer(model=model, args=args, train_dataset=_Tokens())
    assert LisaCallback.optimizer_for(trainer) is trainer.optimizer


def test_resumed_trainer_continues_the_schedule(tmp_path):
    model = tiny_llama()
    lisa = LisaCallback(n_active_layers=2, interval_steps=3, seed=4, state_policy="keep")
    opt = LisaCallback.optimizer_for(model, lr=1e-3)
    args, control = training_args(tmp_path), TrainerControl()
    lisa.on_train_begin(args, TrainerState(global_step=7), control, model=model, optimizer=opt)
    assert lisa.controller.period == 2
    assert lisa.controller.active_layers == lisa.controller.sampler.layers_for_period(2)


def test_callback_arguments():
    with pytest.raises(TypeError, match="either a LisaConfig or LisaConfig fields"):
        LisaCallback(LisaConfig(), seed=1)
    with pytest.raises(ValueError, match="LisaConfig.interval_steps"):
        LisaCallback(interval_steps=0)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_trainer_own_fused_adamw_parks_on_cuda(tmp_path):
    finals = {}
    for policy in ("keep", "park"):
        lisa = LisaCallback(n_active_layers=1, interval_steps=2, seed=3, state_policy=policy)
        model, initial, checker, trainer = run_trainer(tmp_path / policy, lisa, optimizer="trainer",
                                                       optim="adamw_torch_fused", use_cpu=False)
        check_lisa_run(model, initial, checker, lisa)
        finals[policy] = {n: p.detach().cpu() for n, p in model.named_parameters()}
        if policy == "park":
            bank = lisa.controller.parker.bank
            assert bank.pinned and bank.pinned_bytes > 0
            resident = set(lisa.controller.active_layers) | set(
                lisa.controller.sampler.layers_for_period(lisa.controller.period + 1))
            assert layers_with_state_on_device(lisa) <= resident
    assert all(torch.equal(finals["park"][n], finals["keep"][n]) for n in finals["keep"])


def with_lora(model):
    peft = pytest.importorskip("peft")
    return peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))


def test_a_peft_model_is_refused_at_once_with_either_optimizer(tmp_path):
    # LISA would train the base weights, which peft's save_pretrained (adapters only) drops.
    args = training_args(tmp_path)
    refused = r"PeftModel is a peft model .*LoRA.* model.merge_and_unload\(\)"
    with pytest.raises(ValueError, match=refused):  # the Trainer's own optimizer: refused when the Trainer is built
        Trainer(model=with_lora(tiny_llama()), args=args, train_dataset=_Tokens(),
                callbacks=[LisaCallback(n_active_layers=1, interval_steps=2)])
    with pytest.raises(ValueError, match=refused):
        LisaCallback.optimizer_for(with_lora(tiny_llama()), args)
    trainer = Trainer(model=with_lora(tiny_llama()), args=args, train_dataset=_Tokens())
    trainer.add_callback(LisaCallback(n_active_layers=1, interval_steps=2))  # after the Trainer's init
    with pytest.raises(ValueError, match=refused):
        trainer.train()
    merged = with_lora(tiny_llama()).merge_and_unload()  # a plain model again
    Trainer(model=merged, args=args, train_dataset=_Tokens(), callbacks=[LisaCallback()],
            optimizers=(LisaCallback.optimizer_for(merged, args), None))


def test_trainer_module_wise_trains_sampled_modules_only_and_resumes_mid_period(tmp_path):
    def run(out, resume=None):
        model = tiny_llama()
        args = training_args(out, save_strategy="steps", save_steps=5, optim="adamw_torch")
        lisa = LisaCallback(n_active_layers=1, interval_steps=2, seed=3, granularity="module")
        checker = _FrozenModulesStayPut(lisa)
        trainer = Trainer(model=model, args=args, train_dataset=_Tokens(), callbacks=[lisa, checker])
        trainer.train(resume_from_checkpoint=resume)
        return model, lisa, checker

    whole, lisa, checker = run(tmp_path / "whole")
    assert checker.steps == 12 and checker.failures == []
    log = lisa.controller.period_log
    assert len({tuple(e["modules"]) for e in log}) > 1 and all(e["module_grad_norms"] for e in log)
    # Step 5 is inside period 2: the checkpoint carries that period's gradient sums so far.
    resumed, resumed_lisa, _ = run(tmp_path / "whole", resume=str(tmp_path / "whole" / "checkpoint-5"))
    assert all(torch.equal(p, q) for p, q in zip(resumed.parameters(), whole.parameters()))
    keys = ("period", "modules", "module_grad_norms", "always_grad_norm")
    assert [[e[k] for k in keys] for e in resumed_lisa.controller.period_log] == [[e[k] for k in keys] for e in log]


class _FrozenModulesStayPut(_FrozenLayersStayPut):
    """As `_FrozenLayersStayPut`, for the modules inside the layers: a decoder parameter changes iff its module is
    active."""

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.steps += 1
        ctrl = self.lisa.controller
        active = {id(p) for u in ctrl.active_units for p in ctrl._unit_params[u]}
        for name, p in model.named_parameters():
            changed = not torch.equal(p, self.before[name])
            if layer_of(name) is not None and changed != (id(p) in active):
                self.failures.append((state.global_step, name, changed))


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (Liger's kernels)")
def test_trl_sft_trainer_with_liger_kernel_trains_the_sampled_layers(tmp_path):
    """TRL's SFTConfig(use_liger_kernel=True): Liger's fused linear cross-entropy (no logits on the device) with
    LisaCallback, frozen layers untouched, every sampled layer trained."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from lisa_trainer.demo import build_demo_tokenizer

    tok = build_demo_tokenizer()
    model = tiny_llama()
    model.resize_token_embeddings(len(tok))
    initial = {n: p.detach().clone() for n, p in model.named_parameters()}
    lisa = LisaCallback(n_active_layers=1, interval_steps=2, seed=3)
    checker = _FrozenLayersStayPut(lisa)
    config = SFTConfig(output_dir=str(tmp_path), max_steps=12, per_device_train_batch_size=2,
                       gradient_accumulation_steps=2, learning_rate=1e-2, lr_scheduler_type="constant", report_to=[],
                       save_strategy="no", logging_steps=1, disable_tqdm=True, seed=0, max_length=32,
                       use_liger_kernel=True)
    texts = [f"question {i}: what is {i} plus {i}? answer: {2 * i}." for i in range(32)]
    trainer = SFTTrainer(model=model, args=config, train_dataset=Dataset.from_dict({"text": texts}),
                         processing_class=tok, callbacks=[lisa, checker])
    trainer.train()
    check_lisa_run(model, {n: t.to(model.device) for n, t in initial.items()}, checker, lisa)
