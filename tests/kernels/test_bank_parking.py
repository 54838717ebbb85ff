"""FusedAdamW and StateParker parking through a HostStateBank: park/unpark bit-identical to keeping, state dicts,
on both backends (the bank's own tests are in test_host_state_bank.py)."""

import copy

import pytest
import torch
from bank_checks import DEVICE, assert_bitwise_equal, cuda, make_bank

from lisa_kernels.host_state_bank import HostStateBank
from lisa_kernels.state_parking import ParkedState, StateParker
from lisa_kernels.optimizer import FusedAdamW


def inputs(dtype=torch.float32, seed=1):
    return torch.randn(8, 16, generator=torch.Generator().manual_seed(seed)).to(device=DEVICE, dtype=dtype)


def make_model(seed=0, dtype=torch.float32):
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(16, 16) for _ in range(4)]
    return torch.nn.Sequential(*layers).to(device=DEVICE, dtype=dtype)


def train_step(model, opt, x):
    opt.zero_grad(set_to_none=True)
    model(x).float().pow(2).mean().backward()
    opt.step()


def lisa_run(policy, backend, steps=12, switch_every=3, amsgrad=False, dtype=torch.float32, prefetch=False):
    """A LISA-shaped run: one of the 4 layers trains at a time; at a switch the others' state is parked (or kept)."""
    model = make_model(dtype=dtype)
    bank = make_bank(backend) if policy == "park" else None
    opt = FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, amsgrad=amsgrad, state_bank=bank)
    x = inputs(dtype)
    order = [0, 2, 1, 2, 0, 3]
    for step in range(steps):
        active = order[step // switch_every % len(order)]
        if step % switch_every == 0:
            for i, layer in enumerate(model):
                layer.requires_grad_(i == active)
                if i != active and policy == "park":
                    opt.state_parker.park(layer.parameters())
        if prefetch and policy == "park" and step % switch_every == switch_every - 1:
            nxt = order[(step + 1) // switch_every % len(order)]
            opt.state_parker.prefetch(model[nxt].parameters())
        train_step(model, opt, x)
    return model, opt


@pytest.mark.parametrize("amsgrad", [False, True])
def test_park_unpark_is_bit_identical(backend, amsgrad):
    model = make_model()
    opt = FusedAdamW(model.parameters(), lr=1e-2, amsgrad=amsgrad, state_bank=make_bank(backend))
    x = inputs()
    for _ in range(3):
        train_step(model, opt, x)
    before = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in model.parameters()}
    n_moments = 3 if amsgrad else 2
    opt.state_parker.park(model[1:].parameters())
    parked = list(model[1:].parameters())
    assert all(opt.state_parker.is_parked(p) and list(opt.state[p]) == list(before[p]) for p in parked)
    assert all(isinstance(v, ParkedState) for p in parked for k, v in opt.state[p].items() if k != "step")
    assert opt.state_bank.bytes_held == sum(p.numel() * 4 * n_moments for p in parked)
    opt.state_parker.unpark(parked)
    assert opt.state_bank.bytes_held == 0 and not opt.state_parker.parked_params
    for p in model.parameters():
        assert list(opt.state[p]) == list(before[p])
        for k, v in before[p].items():
            assert_bitwise_equal(opt.state[p][k], v)


@pytest.mark.parametrize("dtype,amsgrad", [(torch.float32, False), (torch.float32, True), (torch.bfloat16, False)],
                         ids=["fp32", "fp32-amsgrad", "bf16"])
def test_lisa_run_with_parking_equals_keeping(backend, dtype, amsgrad):
    kept_model, kept_opt = lisa_run("keep", backend, amsgrad=amsgrad, dtype=dtype)
    park_model, park_opt = lisa_run("park", backend, amsgrad=amsgrad, dtype=dtype, prefetch=True)
    assert len(park_opt.state_parker.parked_params) > 0  # something is parked at the end...
    for a, b in zip(park_model.parameters(), kept_model.parameters()):
        assert_bitwise_equal(a.detach(), b.detach())  # ...and the weights are exactly those of a never-parked run


def test_state_dict_includes_parked_state(backend):
    kept_model, kept_opt = lisa_run("keep", backend)
    park_model, park_opt = lisa_run("park", backend)
    kept_sd, park_sd = kept_opt.state_dict(), park_opt.state_dict()
    assert park_sd["param_groups"] == kept_sd["param_groups"]
    assert park_sd["state"].keys() == kept_sd["state"].keys()
    for i, entry in kept_sd["state"].items():
        assert list(park_sd["state"][i]) == list(entry)
        for k, v in entry.items():
            assert_bitwise_equal(park_sd["state"][i][k].to(v.device), v)
    # Saving did not unpark or mutate anything.
    parked = park_opt.state_parker.parked_params
    assert len(parked) > 0 and all(isinstance(park_opt.state[p]["exp_avg"], ParkedState) for p in parked)


def test_load_state_dict_parks_frozen_params(backend):
    src_model, src_opt = lisa_run("keep", backend)
    sd = copy.deepcopy(src_opt.state_dict())
    model = copy.deepcopy(src_model)
    for i, layer in enumerate(model):
        layer.requires_grad_(i == 2)
    opt = FusedAdamW(model.parameters(), lr=1e-2, weight_decay=0.1, state_bank=make_bank(backend))
    opt.load_state_dict(sd)  # the parker's default: frozen params' state goes straight into the bank
    frozen_with_state = [p for layer in model[:2] for p in layer.parameters()]  # layer 3 never trained
    assert set(opt.state_parker.parked_params) == set(frozen_with_state) and opt.state_bank.bytes_held > 0
    for p in model[2].parameters():
        assert not opt.state_parker.is_parked(p) and "exp_avg" in opt.state[p]
    reloaded = opt.state_dict()  # parked state still in the checkpoint, exactly
    for i, entry in sd["state"].items():
        for k, v in entry.items():
            assert_bitwise_equal(reloaded["state"][i][k].to(v.device), v)
    # Loading again replaces everything, including what was parked.
    model.requires_grad_(True)
    opt.load_state_dict(sd)
    assert not opt.state_parker.parked_params and opt.state_bank.bytes_held == 0


def test_drop_state_resets(backend):
    model = make_model()
    opt = FusedAdamW(model.parameters(), lr=1e-2, state_bank=make_bank(backend))
    x = inputs()
    train_step(model, opt, x)
    opt.state_parker.park(model[0].parameters())
    opt.state_parker.drop(model.parameters())
    assert opt.state_bank.bytes_held == 0 and not opt.state_parker.parked_params and len(opt.state) == 0
    train_step(model, opt, x)
    assert all(opt.state[p]["step"].item() == 1.0 for p in model.parameters())


def test_bank_created_on_first_park():
    model = make_model()
    opt = FusedAdamW(model.parameters(), lr=1e-2)
    train_step(model, opt, inputs())
    assert opt.state_parker._bank is None
    opt.state_parker.park(model.parameters())
    assert isinstance(opt.state_bank, HostStateBank) and len(opt.state_bank) == 8 * 2


@pytest.mark.cuda
@cuda
def test_cuda_parking_frees_device_memory(backend):
    model = make_model()
    opt = FusedAdamW(model.parameters(), lr=1e-2, state_bank=make_bank(backend))
    big = torch.nn.Parameter(torch.randn(4096, 1024, device="cuda"))  # 16 MiB: 32 MiB of moments
    opt.add_param_group({"params": [big]})
    big.grad = torch.randn_like(big)
    opt.step()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    opt.state_parker.park([big])
    torch.cuda.synchronize()
    freed = before - torch.cuda.memory_allocated()
    assert freed >= 2 * big.numel() * 4, freed
    assert opt.state_bank.pinned and opt.state_bank.pinned_bytes == 2 * big.numel() * 4
    opt.state_parker.unpark([big])
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before < big.numel()  # back, and nothing left over


@pytest.mark.cuda
@cuda
@pytest.mark.parametrize("optimizer", ["FusedAdamW", "torch-AdamW-fused"])
def test_cuda_restore_then_step_equals_synchronous(backend, optimizer):
    results = []
    for non_blocking in (False, True):
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(1 << 20, device="cuda"))
        bank = make_bank(backend, chunk_bytes=64 << 20)
        if optimizer == "FusedAdamW":
            opt = FusedAdamW([p], lr=1e-2, state_bank=bank)
        else:
            opt = torch.optim.AdamW([p], lr=1e-2, fused=True)
            StateParker(opt, bank)
        for step in range(4):
            p.grad = torch.randn_like(p)
            opt.step()
            opt.state_parker.park([p])
            # Keep the current stream busy so an unordered copy would be caught reading/writing too early.
            busy = torch.randn(2048, 2048, device="cuda")
            for _ in range(20):
                busy = busy @ busy / 2048 ** 0.5
            if step % 2:
                opt.state_parker.prefetch([p])
            opt.state_parker.unpark([p], non_blocking=non_blocking)
            p.grad = torch.randn_like(p)
            opt.step()
        torch.cuda.synchronize()
        results.append((p.detach().clone(), {k: v.clone() for k, v in opt.state[p].items()}))
    (p_sync, s_sync), (p_async, s_async) = results
    assert_bitwise_equal(p_async, p_sync)
    for k in s_sync:
        assert_bitwise_equal(s_async[k], s_sync[k])
