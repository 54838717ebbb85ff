"""Row-sparse embedding state (bit-identical to dense AdamW) and per-group state dtype."""
import io
import logging

import pytest
import torch
import transformers

from lisa_kernels import FusedAdamW, StateParker, sparse_rows
from lisa_kernels.state_parking import ParkedState
from lisa_trainer import LisaConfig, build_optimizer

ROWS, DIM = 37, 16
# Rows with a nonzero gradient at each step: new tokens appear mid-run (7, 20 at step 2; 36 at step 4), rows with
# state get zero-gradient steps (1 at steps 2-5), step 3 touches nothing new.
TOUCHED = [[1, 5], [5], [5, 7, 20], [7], [0, 36, 20], [5]]
# torch's fused CPU kernel uses FMA in its vector lanes and not in its scalar tail (the last numel % 16 elements),
# so it is exact for rows of a multiple of 16 elements (every LLM hidden size); the other paths for any width.
PATHS = {"cpu": dict(dim=DIM), "interpreter": dict(triton_on_cpu=True, dim=5), "foreach": dict(foreach=True, dim=5)}


def gradients(dtype=torch.float32, dim=DIM):
    gen = torch.Generator().manual_seed(0)
    grads = []
    for rows in TOUCHED:
        g = torch.zeros(ROWS, dim, dtype=dtype)
        g[rows] = torch.randn(len(rows), dim, generator=gen).to(dtype)
        g[rows[0], 0] = 0.0  # a zero element inside a touched row
        grads.append(g)
    return grads


def initial_weight(dtype=torch.float32, dim=DIM):
    return torch.randn(ROWS, dim, generator=torch.Generator().manual_seed(1)).to(dtype)


def run(grads, sparse, steps=None, opt_kwargs=None, dtype=torch.float32, state=None, device="cpu"):
    """-> (weight, optimizer) after stepping through `grads` (or the first `steps` of them)."""
    weight = torch.nn.Parameter(initial_weight(dtype, grads[0].shape[1]).to(device))
    opt = FusedAdamW([weight], lr=0.05, sparse_rows=sparse, **(opt_kwargs or {}))
    if state is not None:
        weight.data.copy_(state[0])
        opt.load_state_dict(state[1])
    for g in grads[:steps]:
        weight.grad = g.to(device)
        opt.step()
    return weight, opt


def dense_view(state):
    """Compact moments scattered into zeros of the weight's shape."""
    out = {}
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        if key in state:
            shape = (ROWS, *state[key].shape[1:])
            out[key] = torch.zeros(shape, dtype=state[key].dtype).index_copy_(0, state["rows"], state[key])
    return out


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
    """The Triton kernel runs the same arithmetic for every element, wherever a row sits in the tensor."""
    kwargs = dict(weight_decay=0.1)
    dense_w, _ = run(gradients(dtype, dim), False, opt_kwargs=kwargs, dtype=dtype, device="cuda")
    sparse_w, _ = run(gradients(dtype, dim), True, opt_kwargs=kwargs, dtype=dtype, device="cuda")
    assert torch.equal(sparse_w, dense_w)


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


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=48, max_position_embeddings=16,
                                      tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("tied", [False, True])
def test_build_optimizer_row_sparse_for_untied_embedding_only(tied, caplog):
    model = tiny_llama(tied)
    with caplog.at_level(logging.INFO, logger="lisa_trainer.controller"):
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


def test_cli_flag_sets_embedding_state_dtype():
    from lisa_trainer.cli import parse_options

    assert parse_options(["--demo", "--lisa_embedding_state_dtype", "bfloat16"]).lisa.embedding_state_dtype == "bfloat16"
    assert parse_options(["--demo"]).lisa.embedding_state_dtype is None


# Sparse COO gradients, as nn.Embedding(sparse=True) gives them: (rows, scale) entries per step, uncoalesced. Rows 5
# and 7 come twice in a step (duplicates, summed by coalescing; two terms sum alike in any order, so `to_dense()`
# gives the same dense gradient), row 30 comes with all-zero values (it must stay out of the state), row 1 (which has
# state) with zero values at step 2, and row 12 at step 1 as +v and -v (a sum of exactly zero: not touched).
SPARSE_STEPS = [[(1, 1), (5, 1), (5, 1)], [(5, 1), (30, 0), (12, 1), (12, -1)], [(5, 1), (7, 1), (20, 1), (7, 1), (1, 0)],
                [(7, 1), (7, 1)], [(0, 1), (36, 1), (20, 1), (30, 0)], [(5, 1)]]


def sparse_gradients(dtype=torch.float32, dim=DIM):
    gen = torch.Generator().manual_seed(2)
    grads = []
    for entries in SPARSE_STEPS:
        rows = torch.tensor([[r for r, _ in entries]])
        values = torch.randn(len(entries), dim, generator=gen)
        for i, (row, scale) in enumerate(entries):  # row 12's -v is its +v negated
            values[i] = -values[i - 1] if scale == -1 else values[i] * scale
        grads.append(torch.sparse_coo_tensor(rows, values.to(dtype), (ROWS, dim), check_invariants=True))
    return grads


SPARSE_OPTIONS = {"plain": dict(weight_decay=0.0), "decay": dict(weight_decay=0.1),
                  "amsgrad-maximize-scaled": dict(weight_decay=0.1, amsgrad=True, maximize=True, grad_scale=4.0),
                  "bf16": dict(weight_decay=0.1, dtype=torch.bfloat16)}


def run_with_scale(grads, sparse_rows_state, opt_kwargs, dtype):
    """`run`, with GradScaler's grad_scale / found_inf handed to each step as GradScaler.step does."""
    scale = opt_kwargs.pop("grad_scale", None)
    weight = torch.nn.Parameter(initial_weight(dtype, grads[0].shape[1]))
    opt = FusedAdamW([weight], lr=0.05, sparse_rows=sparse_rows_state, **opt_kwargs)
    for g in grads:
        weight.grad = g * scale if scale else g
        if scale:
            opt.grad_scale, opt.found_inf = torch.tensor(scale), torch.tensor(0.0)
        opt.step()
    return weight, opt


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("options", SPARSE_OPTIONS)
def test_sparse_gradient_steps_bit_identical_to_its_dense_form(path, options):
    kwargs = dict(**SPARSE_OPTIONS[options], **PATHS[path])
    dim, dtype = kwargs.pop("dim"), kwargs.pop("dtype", torch.float32)
    sparse_grads = sparse_gradients(dtype, dim)
    assert not sparse_grads[0].is_coalesced()
    dense_w, dense = run_with_scale([g.to_dense() for g in sparse_grads], True, dict(kwargs), dtype)
    sparse_w, sparse = run_with_scale(sparse_grads, True, dict(kwargs), dtype)
    assert sparse_w.grad.is_sparse
    assert torch.equal(sparse_w, dense_w)
    state, dense_state = sparse.state[sparse_w], dense.state[dense_w]
    assert state["rows"].tolist() == dense_state["rows"].tolist() == [0, 1, 5, 7, 20, 36]
    for key in ("exp_avg", "exp_avg_sq", "max_exp_avg_sq"):
        assert (key in state) == (key in dense_state)
        if key in state:
            assert torch.equal(state[key], dense_state[key]), key


def test_sparse_gradient_park_and_checkpoint():
    """Sparse gradients around parking, a state_dict round trip and state loaded straight into the bank."""
    kwargs = dict(weight_decay=0.1)
    expected, _ = run([g.to_dense() for g in sparse_gradients()], False, opt_kwargs=kwargs)
    weight, opt = run(sparse_gradients(), True, steps=3, opt_kwargs=kwargs)
    opt.state_parker.park(weight)
    saved = opt.state_dict()
    assert saved["state"][0]["rows"].tolist() == [1, 5, 7, 20]
    reloaded_w = torch.nn.Parameter(weight.detach().clone())
    reloaded = FusedAdamW([reloaded_w], lr=0.05, sparse_rows=True, **kwargs)
    reloaded.load_state_dict(saved, park="all")
    for w, o in ((weight, opt), (reloaded_w, reloaded)):
        for g in sparse_gradients()[3:]:
            w.grad = g
            o.step()
        assert torch.equal(w, expected)


def test_sparse_gradient_refused_where_it_cannot_be_stepped():
    dense_param, embedding = torch.nn.Parameter(torch.zeros(ROWS, DIM)), torch.nn.Parameter(torch.zeros(ROWS, DIM))
    opt = FusedAdamW([{"params": [dense_param]}, {"params": [embedding], "sparse_rows": True}])
    dense_param.grad = sparse_gradients()[0]
    with pytest.raises(RuntimeError, match="parameter 0 of param group 0 has a sparse gradient.*sparse_rows=True"):
        opt.step()
    dense_param.grad = None
    embedding.grad = sparse_gradients()[0].to_dense().to_sparse()  # sparse in both dims
    with pytest.raises(RuntimeError, match=r"parameter 0 of param group 1 .*\(2 sparse dims\).*along dim 0 only"):
        opt.step()
    assert not opt.state[dense_param] and not opt.state[embedding]


def test_sparse_embedding_matches_torch_adamw_on_a_dense_twin():
    """nn.Embedding(sparse=True) + FusedAdamW(sparse_rows=True) against nn.Embedding + torch.optim.AdamW, two
    micro-batches a step (an uncoalesced gradient). The loss weights are multiples of 1/8, so every gradient element
    is a sum of exact dyadic numbers, the same in any order: the gradients agree exactly, and so must the steps."""
    gen = torch.Generator().manual_seed(3)
    sparse_emb, dense_emb = torch.nn.Embedding(ROWS, DIM, sparse=True), torch.nn.Embedding(ROWS, DIM)
    dense_emb.weight.data.copy_(sparse_emb.weight.data)
    ours = FusedAdamW(sparse_emb.parameters(), lr=0.05, weight_decay=0.1, sparse_rows=True)
    theirs = torch.optim.AdamW(dense_emb.parameters(), lr=0.05, weight_decay=0.1, fused=True)
    for step in range(5):
        vocab = 12 + 5 * step  # new tokens appear as the run goes on
        for _ in range(2):
            tokens = torch.randint(0, vocab, (3, 7), generator=gen)
            weights = torch.randint(-8, 9, (3, 7, DIM), generator=gen) / 8
            for emb in (sparse_emb, dense_emb):
                (emb(tokens) * weights).sum().backward()
        assert sparse_emb.weight.grad.is_sparse and not sparse_emb.weight.grad.is_coalesced()
        ours.step()
        theirs.step()
        ours.zero_grad()
        theirs.zero_grad()
        assert torch.equal(sparse_emb.weight, dense_emb.weight)
    state, torch_state = ours.state[sparse_emb.weight], theirs.state[dense_emb.weight]
    for key, moment in dense_view(state).items():
        assert torch.equal(moment, torch_state[key]), key
