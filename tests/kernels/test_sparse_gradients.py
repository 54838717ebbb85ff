"""Sparse embedding gradients: FusedAdamW steps them bit-identically to their dense form, parks and checkpoints
them, refuses them where they cannot be stepped; the trainer's sparse-aware gradient norm and clipping; a tiny run
with them trains as dense (row-sparse state: test_sparse_rows.py)."""

import logging

import pytest
import torch
from embedding_rows import DIM, PATHS, ROWS, dense_view, initial_weight, run, sparse_gradients, tiny_llama

from lisa_kernels import FusedAdamW
from lisa_trainer import LisaConfig, build_optimizer
from lisa_trainer.gradients import clip_grad_norm
from lisa_trainer.memory import use_sparse_embedding_grad

SPARSE_OPTIONS = {"plain": dict(weight_decay=0.0), "decay": dict(weight_decay=0.1),
                  "amsgrad-maximize-scaled": dict(weight_decay=0.1, amsgrad=True, maximize=True, grad_scale=4.0),
                  "bf16": dict(weight_decay=0.1, dtype=torch.bfloat16)}
LR = 3e-3


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


def test_clip_grad_norm_equals_torch_for_dense_gradients():
    gen = torch.Generator().manual_seed(4)
    shapes_and_dtypes = [((7, 5), torch.float32), ((13,), torch.bfloat16), ((3, 4, 2), torch.float32), ((9,), torch.float64)]
    for max_norm in (0.0, 0.5, 1e3):  # off, clipping, a norm below the limit (scaled by 1: unchanged)
        ours = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in shapes_and_dtypes]
        theirs = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in shapes_and_dtypes]
        for p, q in zip(ours, theirs):
            p.grad = (torch.randn(p.shape, generator=gen, dtype=torch.float64) * 3).to(p.dtype)
            q.grad = p.grad.clone()
        norm = clip_grad_norm(ours, max_norm)
        torch_norm = torch.nn.utils.clip_grad_norm_(theirs, max_norm if max_norm else float("inf"))
        assert norm == float(torch_norm)
        for p, q in zip(ours, theirs):
            assert torch.equal(p.grad, q.grad)
        after = float(torch.linalg.vector_norm(torch.cat([p.grad.double().flatten() for p in ours])))
        assert after == pytest.approx(min(norm, max_norm or norm), rel=1e-2)  # 1e-2: bf16 rounding
    assert clip_grad_norm([], 1.0) == 0.0


def test_clip_grad_norm_takes_sparse_gradients():
    """A sparse gradient counts by its coalesced values and is scaled like the dense ones, as its dense form is."""
    sparse = torch.nn.Parameter(torch.zeros(ROWS, DIM))
    dense = torch.nn.Parameter(torch.zeros(ROWS, DIM))
    other, other_twin = torch.nn.Parameter(torch.zeros(5, 3)), torch.nn.Parameter(torch.zeros(5, 3))
    sparse.grad = sparse_gradients()[0]
    dense.grad = sparse.grad.to_dense()
    other.grad = torch.randn(5, 3, generator=torch.Generator().manual_seed(5))
    other_twin.grad = other.grad.clone()
    norm = clip_grad_norm([sparse, other], 0.5)
    torch_norm = torch.nn.utils.clip_grad_norm_([dense, other_twin], 0.5)
    assert norm == pytest.approx(float(torch_norm), rel=1e-6) and norm > 1  # summed in another order
    assert sparse.grad.is_sparse and sparse.grad.is_coalesced()
    torch.testing.assert_close(sparse.grad.to_dense(), dense.grad, rtol=1e-6, atol=0)
    torch.testing.assert_close(other.grad, other_twin.grad, rtol=1e-6, atol=0)


@pytest.mark.parametrize("tied", [False, True])
def test_sparse_embedding_grad_only_with_row_sparse_state_on_one_process(tied, caplog):
    model = tiny_llama(tied)
    embedding = model.get_input_embeddings()
    opt = build_optimizer(model, LisaConfig(state_policy="keep"), lr=1e-2)
    with caplog.at_level(logging.INFO, logger="lisa_trainer.memory"):
        assert use_sparse_embedding_grad(model, opt, True, data_parallel=False) is not tied
        assert embedding.sparse is not tied
        ids = torch.tensor([[3, 9, 9, 4]])
        model(input_ids=ids, labels=ids).loss.backward()
        assert embedding.weight.grad.is_sparse is not tied
        if tied:
            assert "dense gradient (its optimizer state is not FusedAdamW's row-sparse state" in caplog.text
            return
        assert "row-sparse gradient" in caplog.text
        torch_adamw = build_optimizer(model, lr=1e-2, optim="adamw_torch")
        for enabled, data_parallel, optimizer, reason in ((False, False, opt, "sparse_embedding_grad is off"),
                                                          (True, True, opt, "data-parallel"),
                                                          (True, False, torch_adamw, "row-sparse state")):
            embedding.sparse = True
            assert not use_sparse_embedding_grad(model, optimizer, enabled, data_parallel=data_parallel)
            assert embedding.sparse is False and reason in caplog.records[-1].getMessage()
        model.model.embed_tokens = torch.nn.Sequential(embedding)  # a module without a `sparse` flag of its own
        model.model.embed_tokens.weight = embedding.weight
        assert not use_sparse_embedding_grad(model, opt, True, data_parallel=False)
        assert "Sequential has no `sparse` flag" in caplog.records[-1].getMessage()


def train_tiny(tmp_path, tok, sparse_grad: bool, steps: int, **args):
    """(trainer, step records, whether the input embedding's gradient was sparse at each optimizer step)."""
    from lisa_trainer.data import load_and_tokenize
    from lisa_trainer.demo import build_demo_model, demo_dataset_path
    from lisa_trainer.trainer import LisaTrainer, LisaTrainingArguments

    data = load_and_tokenize(demo_dataset_path(), tok, block_size=32)
    model = build_demo_model(tok, seed=0, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1)
    arguments = LisaTrainingArguments(output_dir=str(tmp_path), learning_rate=LR, weight_decay=0.1, max_steps=steps,
                                      per_device_train_batch_size=2, progress=False, save_model=False, **args)
    lisa = LisaConfig(n_active_layers=1, interval_steps=2, state_policy="keep", sparse_embedding_grad=sparse_grad)
    trainer = LisaTrainer(model, tok, type(data)(data.examples[:12], {}), arguments, lisa)
    embedding = model.get_input_embeddings().weight
    sparse_at_step = []
    trainer.optimizer.register_step_pre_hook(lambda *_: sparse_at_step.append(embedding.grad.is_sparse))
    return trainer, [trainer.train_step() for _ in range(steps)], sparse_at_step


@pytest.mark.usefixtures("pytorch_optimizer_path")
@pytest.mark.parametrize("args", [dict(max_grad_norm=0.0),
                                  dict(gradient_accumulation_steps=2, max_grad_norm=0.05, gradient_checkpointing=True)],
                         ids=["unclipped", "accumulated-clipped-checkpointed"])
def test_trainer_with_sparse_embedding_grad_trains_as_dense(tmp_path, tok, args):
    """The same run with the embedding's gradient sparse and dense. The gradients of a repeated token are summed in
    another order (coalescing vs the dense embedding backward), so the embedding's gradient, the gradient norm and,
    after the first step, every gradient differ by fp32 rounding. Adam's update divides by the gradient's own scale,
    so where a gradient element is small after cancellation its rounding reaches the update: measured at most
    2e-5 x lr per weight after 3 steps, hence the bound 1e-4 x lr (a sparse gradient left unclipped moves the
    embedding by 5e-2 x lr). Moments agree to 1e-5 relative; the loss and the gradient norm to fp32 rounding."""
    steps = 3
    dense, dense_records, dense_sparse_at = train_tiny(tmp_path / "dense", tok, False, steps, **args)
    sparse, sparse_records, sparse_sparse_at = train_tiny(tmp_path / "sparse", tok, True, steps, **args)
    assert sparse_sparse_at == [True] * steps and dense_sparse_at == [False] * steps
    if args["max_grad_norm"]:
        assert all(r["grad_norm"] > 10 * args["max_grad_norm"] for r in dense_records)  # clipping acts every step
    for d, s in zip(dense_records, sparse_records):
        assert s["loss"] == pytest.approx(d["loss"], rel=1e-6)
        assert s["grad_norm"] == pytest.approx(d["grad_norm"], rel=1e-5)
    for (name, p), q in zip(dense.model.named_parameters(), sparse.model.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-4 * LR, msg=name)
    embedding = dense.model.get_input_embeddings().weight
    state = sparse.optimizer.state[sparse.model.get_input_embeddings().weight]
    dense_state = dense.optimizer.state[embedding]
    assert state["rows"].tolist() == dense_state["rows"].tolist()
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(state[key], dense_state[key], rtol=1e-5, atol=1e-5 * float(dense_state[key].abs().max()))


def test_clip_grad_norm_without_get_total_norm(monkeypatch):
    """torch < 2.6 has no get_total_norm: the same norm of norms, summed in the given order (torch's own order is
    its grouping by device and dtype), so equal to rounding."""
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in (((7, 5), torch.float32), ((13,), torch.bfloat16))]
    for i, p in enumerate(params):
        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(i)).to(p.dtype)
    expected = float(torch.nn.utils.get_total_norm([p.grad for p in params]))
    monkeypatch.delattr(torch.nn.utils, "get_total_norm")
    assert clip_grad_norm(params, 0.0) == pytest.approx(expected, rel=1e-6)
