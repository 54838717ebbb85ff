"""StateParker on torch's and transformers' optimizers: parking equals keeping, bit for bit; state_dict, deepcopy and
pickle carry parked state; a shared bank forgets an optimizer that goes away.

A tiny random-weight Llama (4 layers) trains on fixed random batches under LisaController (one layer per period,
a switch every 2 steps). Without a GPU the bank's "device" is the CPU; the `cuda` tests check the real thing.
"""
import copy
import gc
import io

import pytest
import torch
import transformers
from transformers.optimization import Adafactor

from lisa_kernels import FusedAdamW, HostStateBank, ParkedState, StateParker
from lisa_trainer import LisaConfig, LisaController

N_LAYERS = 4
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")

pytestmark = pytest.mark.usefixtures("pytorch_optimizer_path")

OPTIMIZERS = {
    "adamw-foreach": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, foreach=True),
    "adamw-fused": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "adam-amsgrad": lambda ps: torch.optim.Adam(ps, lr=1e-2, amsgrad=True),
    "adafactor": lambda ps: Adafactor(ps, lr=1e-2, scale_parameter=False, relative_step=False, beta1=0.9),
    "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, weight_decay=0.1),
    "fused-adamw": lambda ps: FusedAdamW(ps, lr=1e-2, weight_decay=0.1),
}


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=64,
                                      max_position_embeddings=32, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.AutoModelForCausalLM.from_config(config).to(DEVICE)


def train(model, opt, ctrl, steps, start=0):
    for step in range(start, start + steps):
        ctrl.on_step_begin(step)
        ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(1000 + step)).to(DEVICE)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        ctrl.on_step_end(step)


def lisa_run(name, policy, steps=8):
    model = tiny_llama()
    opt = OPTIMIZERS[name](list(model.parameters()))
    ctrl = LisaController(model, opt, LisaConfig(n_active_layers=1, interval_steps=2, seed=3, state_policy=policy))
    train(model, opt, ctrl, steps)
    return model, opt, ctrl


def on_device(opt, p):
    return any(isinstance(v, torch.Tensor) and v.dim() > 0 for v in opt.state.get(p, {}).values())


def layers_on_device(ctrl, opt):
    return {i for i in range(N_LAYERS) if any(on_device(opt, p) for p in ctrl.layer_parameters(i))}


def assert_same_weights(a, b):
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_parking_equals_keeping(name):
    kept_model, kept_opt, kept_ctrl = lisa_run(name, "keep")
    park_model, park_opt, park_ctrl = lisa_run(name, "park")
    assert len({tuple(e["layers"]) for e in park_ctrl.period_log}) > 1
    assert layers_on_device(park_ctrl, park_opt) == set(park_ctrl.active_layers)
    assert len(layers_on_device(kept_ctrl, kept_opt)) > 1
    parked = park_ctrl.parker.parked_params
    assert parked and park_ctrl.parker.bank.bytes_held > 0
    for p in parked:  # every tensor parked; scalars (step, Adafactor's RMS) and non-tensors left in place
        values = park_opt.state[p].values()
        assert any(isinstance(v, ParkedState) for v in values) and not on_device(park_opt, p)
    assert_same_weights(park_model, kept_model)
    # The checkpoint of the parking run is the checkpoint of the keeping run.
    park_sd, kept_sd = park_opt.state_dict(), kept_opt.state_dict()
    assert park_sd["state"].keys() == kept_sd["state"].keys()
    for i, entry in kept_sd["state"].items():
        assert list(park_sd["state"][i]) == list(entry)
        for key, value in entry.items():
            if isinstance(value, torch.Tensor):
                assert torch.equal(park_sd["state"][i][key].to(value.device), value), (i, key)
            else:
                assert park_sd["state"][i][key] == value


@pytest.mark.parametrize("name", ["adamw-foreach", "adafactor", "fused-adamw"])
def test_state_dict_round_trip_with_parked_state(name):
    model, opt, ctrl = lisa_run(name, "park", steps=5)  # stops inside a period
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "lisa": ctrl.state_dict()}, buffer)
    train(model, opt, ctrl, 4, start=5)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed = tiny_llama(seed=9)
    resumed.load_state_dict(saved["model"])
    resumed_opt = OPTIMIZERS[name](list(resumed.parameters()))
    resumed_ctrl = LisaController(resumed, resumed_opt, ctrl.config, start_step=5)
    resumed_ctrl.load_state_dict(saved["lisa"])
    resumed_opt.load_state_dict(saved["opt"])  # frozen layers' state goes straight into the bank
    assert layers_on_device(resumed_ctrl, resumed_opt) <= set(resumed_ctrl.active_layers)
    assert resumed_ctrl.parker.parked_params
    train(resumed, resumed_opt, resumed_ctrl, 4, start=5)
    assert_same_weights(resumed, model)


@pytest.mark.parametrize("name", ["fused-adamw", "adamw-foreach"])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copies_carry_parked_state(name, how):
    model, opt, ctrl = lisa_run(name, "park", steps=5)
    expected = opt.state_dict()
    if how == "deepcopy":
        model_copy, opt_copy = copy.deepcopy((model, opt))
    else:
        buffer = io.BytesIO()
        torch.save((model, opt), buffer)
        buffer.seek(0)
        model_copy, opt_copy = torch.load(buffer, weights_only=False)
    copied = opt_copy.state_dict()
    for i, entry in expected["state"].items():
        for key, value in entry.items():
            assert torch.equal(torch.as_tensor(copied["state"][i][key]).cpu(), torch.as_tensor(value).cpu()), (i, key)
    # The copy trains on like the original (its frozen layers' state came back as device tensors).
    copy_ctrl = LisaController(model_copy, opt_copy, ctrl.config, start_step=5)
    copy_ctrl.load_state_dict(ctrl.state_dict())
    train(model, opt, ctrl, 4, start=5)
    train(model_copy, opt_copy, copy_ctrl, 4, start=5)
    assert_same_weights(model_copy, model)


def test_shared_bank_forgets_an_optimizer_that_goes_away():
    bank = HostStateBank(backend="fallback")
    model = tiny_llama()
    first = torch.optim.AdamW(model.parameters(), lr=1e-2)
    second = FusedAdamW(model.parameters(), lr=1e-2, state_bank=bank)
    StateParker(first, bank)
    for opt in (first, second):
        model(input_ids=torch.ones(1, 4, dtype=torch.long).to(DEVICE)).logits.sum().backward()
        opt.step()
        opt.state_parker.park(model.parameters())
    held = len(bank)
    assert held > 0 and held % 2 == 0
    del first, opt
    gc.collect()
    assert len(bank) == held // 2
    del second
    gc.collect()
    assert len(bank) == 0


def test_parker_arguments():
    opt = torch.optim.SGD(tiny_llama().parameters(), lr=1e-2)
    with pytest.raises(TypeError, match="StateParker needs a torch.optim.Optimizer"):
        StateParker(object())
    with pytest.raises(TypeError, match="bank must be a HostStateBank"):
        StateParker(opt, bank="host")
    with pytest.raises(ValueError, match="park_on_load must be one of"):
        StateParker(opt, park_on_load="frozen-ish")
    parker = StateParker.of(opt)
    assert StateParker.of(opt) is parker
    with pytest.raises(ValueError, match="already has a StateParker"):
        StateParker(opt)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("name", ["adamw-fused", "adafactor"])
def test_cuda_parking_frees_device_memory_and_equals_keeping(name):
    held = {}
    for policy in ("keep", "park"):
        gc.collect()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        model, opt, ctrl = lisa_run(name, policy, steps=10)
        torch.cuda.synchronize()
        weights = {n: p.detach().cpu() for n, p in model.named_parameters()}
        held[policy] = (torch.cuda.memory_allocated() - start, weights)
        if policy == "park":
            assert ctrl.parker.bank.pinned
            resident = set(ctrl.active_layers) | set(ctrl.sampler.layers_for_period(ctrl.period + 1))
            assert layers_on_device(ctrl, opt) <= resident
        del model, opt, ctrl
    assert held["park"][0] < held["keep"][0]
    assert all(torch.equal(held["park"][1][n], held["keep"][1][n]) for n in held["keep"][1])
