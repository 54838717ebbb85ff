"""Row-sparse embedding state (bit-identical to dense AdamW) and per-group state dtype; sparse embedding gradients
and the trainer's clipping of them: test_sparse_gradients.py."""

import io
import logging

import pytest
import torch
from embedding_rows import DIM, PATHS, TOUCHED, dense_view, gradients, initial_weight, run, sparse_gradients, tiny_llama

from lisa_kernels import FusedAdamW, StateParker, sparse_rows
from lisa_kernels.state_parking import ParkedState
from lisa_trainer import LisaConfig, build_optimizer


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("weight_decay,amsgrad", [(0.0, False), (0.1, False), (0.1, True)])
def test_sparse_rows_bit_identical_to_dense(path, weight_decay, amsgrad):
    kwargs = dict(weight_decay=weight_decay, amsgrad=amsgrad, **PATHS[path])
    dim = kwargs.pop("dim")
    dense_w, dense = run(gradients(dim=dim), False, opt_kwargs=kwargs)
    sparse_w, sparse = run(gradients(dim=dim), True, opt_kwargs=kwargs)
    assert torch.equal(sparse_w, dense_w)
    state = sparse.state[sparse_w]
    assert state["rows"].tolist() == sorted({r for rows in TOUCHED for r in rows})
    for key, moment in dense_view(state).items():
        assert torch.equal(moment, dense.state[dense_w][key]), key
    assert state["step"] == dense.state[dense_w]["step"] == len(TOUCHED)
    # The dense moments of rows never touched are exactly zero: what the compact form leaves out.
    assert dense.state[dense_w]["exp_avg_sq"].ne(0).any(dim=1).nonzero().squeeze(1).tolist() == state["rows"].tolist()


def test_sparse_rows_bf16_params_and_torch_adamw():
    """bf16 weights (fp32 moments through working copies) match dense bit for bit; fp32 matches torch's AdamW."""
    kwargs = dict(weight_decay=0.1)
    dense_w, _ = run(gradients(torch.bfloat16), False, opt_kwargs=kwargs, dtype=torch.bfloat16)
    sparse_w, _ = run(gradients(torch.bfloat16), True, opt_kwargs=kwargs, dtype=torch.bfloat16)
    assert torch.equal(sparse_w, dense_w)
    reference = torch.nn.Parameter(initial_weight())
    torch_opt = torch.optim.AdamW([reference], lr=0.05, weight_decay=0.1, fused=True)
    for g in gradients():
        reference.grad = g.clone()
        torch_opt.step()
    assert torch.equal(run(gradients(), True, opt_kwargs=kwargs)[0], reference)


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dim", [5, 64])
def test_sparse_rows_bit_identical_to_dense_on_cuda(dtype, dim):
    """The Triton kernel runs the same arithmetic for every element, wherever a row sits in the tensor; a sparse
    gradient (two entries at most per row: summed alike in any order) steps as its dense form."""
    kwargs = dict(weight_decay=0.1)
    dense_w, _ = run(gradients(dtype, dim), False, opt_kwargs=kwargs, dtype=dtype, device="cuda")
    sparse_w, _ = run(gradients(dtype, dim), True, opt_kwargs=kwargs, dtype=dtype, device="cuda")
    assert torch.equal(sparse_w, dense_w)
    from_dense, _ = run([g.to_dense() for g in sparse_gradients(dtype, dim)], True, opt_kwargs=kwargs, dtype=dtype,
                        device="cuda")
    from_sparse, opt = run(sparse_gradients(dtype, dim), True, opt_kwargs=kwargs, dtype=dtype, device="cuda")
    assert from_sparse.grad.is_sparse and torch.equal(from_sparse, from_dense)
    assert opt.state[from_sparse]["rows"].tolist() == [0, 1, 5, 7, 20, 36]


def test_sparse_rows_state_dict_round_trip_and_torch_checkpoint():
    kwargs = dict(weight_decay=0.1)
    expected, _ = run(gradients(), False, opt_kwargs=kwargs)
    weight, opt = run(gradients(), True, steps=3, opt_kwargs=kwargs)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    assert saved["state"][0]["rows"].dtype == torch.int64 and saved["state"][0]["exp_avg"].shape == (4, DIM)
    resumed, reopened = run(gradients()[3:], True, opt_kwargs=kwargs, state=(weight.detach(), saved))
    assert reopened.state[resumed]["rows"].dtype == torch.int64
    assert torch.equal(resumed, expected)
    # A dense torch.optim.AdamW checkpoint loads into the compact form; compact state in a group saved (or later
    # set) without sparse rows expands to dense at its next step.
    torch_w = torch.nn.Parameter(initial_weight())
    torch_opt = torch.optim.AdamW([torch_w], lr=0.05, weight_decay=0.1)
    for g in gradients()[:3]:
        torch_w.grad = g.clone()
        torch_opt.step()
    from_torch, _ = run(gradients()[3:], True, opt_kwargs=kwargs, state=(torch_w.detach(), torch_opt.state_dict()))
    as_dense = {**saved, "param_groups": [{**g, "sparse_rows": False} for g in saved["param_groups"]]}
    expanded, dense_opt = run(gradients()[3:], True, opt_kwargs=kwargs, state=(weight.detach(), as_dense))
    assert "rows" not in dense_opt.state[expanded]
    for w in (from_torch, expanded):
        assert torch.equal(w, expected)


def test_sparse_rows_park_and_restore():
    kwargs = dict(weight_decay=0.1)
    expected, _ = run(gradients(), False, opt_kwargs=kwargs)
    weight, opt = run(gradients(), True, steps=3, opt_kwargs=kwargs)
    parker = StateParker.of(opt)
    parker.park(weight)
    state = opt.state[weight]
    assert all(isinstance(state[key], ParkedState) for key in ("rows", "exp_avg", "exp_avg_sq"))
    saved = opt.state_dict()  # checkpoints read parked entries back
    assert saved["state"][0]["rows"].tolist() == [1, 5, 7, 20]
    # Loaded straight into the bank, the index and moments come back at the first step, as they were.
    reloaded_w = torch.nn.Parameter(weight.detach().clone())
    reloaded = FusedAdamW([reloaded_w], lr=0.05, sparse_rows=True, **kwargs)
    reloaded.load_state_dict(saved, park="all")
    assert reloaded.state_parker.is_parked(reloaded_w)
    for w, o in ((weight, opt), (reloaded_w, reloaded)):
        for g in gradients()[3:]:  # the step restores the state of a param with a gradient
            w.grad = g.clone()
            o.step()
        assert torch.equal(w, expected)
        assert o.state[w]["rows"].dtype == torch.int64


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_touched_rows_counts_any_nonzero_element(dtype):
    """A subnormal or NaN element makes a row touched; -0.0 moves nothing in dense AdamW, so it does not."""
    g = torch.zeros(6, 5, dtype=dtype)
    g[1, 2], g[3, 0], g[4, 4], g[5, 1] = torch.finfo(dtype).tiny / 4, float("nan"), -0.0, float("-inf")
    assert sparse_rows.touched_rows(g).tolist() == [1, 3, 5]


def test_sparse_rows_refuses_scalars_and_bad_values():
    with pytest.raises(ValueError, match="sparse_rows=True needs parameters with rows"):
        FusedAdamW([torch.nn.Parameter(torch.tensor(1.0))], sparse_rows=True)
    with pytest.raises(ValueError, match="Invalid sparse_rows"):
        FusedAdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "sparse_rows": "yes"}])
    with pytest.raises(ValueError, match="Invalid state_dtype"):
        FusedAdamW([{"params": [torch.nn.Parameter(torch.ones(2))], "state_dtype": torch.float16}])


@pytest.mark.parametrize("tied", [False, True])
def test_build_optimizer_row_sparse_for_untied_embedding_only(tied, caplog):
    model = tiny_llama(tied)
    with caplog.at_level(logging.INFO, logger="lisa_trainer.optimizers"):
        opt = build_optimizer(model, LisaConfig(), lr=1e-2, weight_decay=0.1)
    embedding = model.get_input_embeddings().weight
    group = next(g for g in opt.param_groups if g["params"][0] is embedding)
    assert group["sparse_rows"] is not tied
    message = "dense AdamW state (tied to the output head" if tied else "row-sparse AdamW state"
    assert message in caplog.text
    assert sum(g["sparse_rows"] for g in opt.param_groups) == (0 if tied else 1)
    ids = torch.tensor([[3, 9, 9, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    rows = opt.state[embedding].get("rows")
    # Token 4 comes last: no later position sees it and no label follows it, so its row has no gradient.
    assert (rows is None) if tied else rows.tolist() == [3, 9]


def test_per_group_state_dtype_from_lisa_config():
    model = tiny_llama(False).to(torch.bfloat16)
    opt = build_optimizer(model, LisaConfig(embedding_state_dtype="bfloat16"), lr=1e-2)
    ids = torch.tensor([[3, 9, 9, 4]])
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    lean = {model.get_input_embeddings().weight, model.get_output_embeddings().weight}
    for p in model.parameters():
        assert opt.state[p]["exp_avg"].dtype == (torch.bfloat16 if p in lean else torch.float32)
    # The group's dtype also applies to state loaded straight into the bank.
    saved = opt.state_dict()
    reloaded = build_optimizer(model, LisaConfig(embedding_state_dtype="bfloat16"), lr=1e-2)
    reloaded.load_state_dict(saved, park="all")
    head = model.get_output_embeddings().weight
    assert reloaded.state_parker.is_parked(head)
    assert reloaded.state[head]["exp_avg"].read().dtype == torch.bfloat16
    assert reloaded.state[model.model.layers[0].mlp.up_proj.weight]["exp_avg"].read().dtype == torch.float32
    with pytest.raises(ValueError, match="LisaConfig.embedding_state_dtype"):
        LisaConfig(embedding_state_dtype="float16")


def test_cli_flags_set_embedding_state_dtype_and_sparse_grad():
    from lisa_trainer.cli import parse_options

    assert parse_options(["--demo", "--lisa_embedding_state_dtype", "bfloat16"]).lisa.embedding_state_dtype == "bfloat16"
    assert parse_options(["--demo"]).lisa.embedding_state_dtype is None
    assert parse_options(["--demo"]).lisa.sparse_embedding_grad is True
    assert parse_options(["--demo", "--lisa_sparse_embedding_grad", "0"]).lisa.sparse_embedding_grad is False
    with pytest.raises(ValueError, match="sparse_embedding_grad"):
        LisaConfig(sparse_embedding_grad="yes")
