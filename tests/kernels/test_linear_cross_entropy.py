import json

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from lisa_kernels.linear_cross_entropy import (
    causal_lm_cross_entropy,
    kernel_available,
    linear_cross_entropy,
    linear_cross_entropy_reference,
)
from reference_check import assert_matches_reference, devices

IGNORE = -100


def make_inputs(shape, hidden_size, vocab, dtype, *, bias, seed=0, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*shape, hidden_size, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.randn(vocab, hidden_size, generator=gen) / hidden_size**0.5 * 3).to(device, dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen).to(device, dtype).requires_grad_() if bias else None
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.25] = IGNORE
    return hidden, weight, b, labels.to(device)


def loss_and_grads(loss_fn, hidden, weight, bias, labels, **kw):
    tensors = [t for t in (hidden, weight, bias) if t is not None]
    for t in tensors:
        t.grad = None
    loss = loss_fn(hidden, weight, labels, bias, **kw)
    (loss * 0.37).backward()  # a grad_output other than 1, as the trainer's 1 / trained tokens
    return [loss.detach()] + [t.grad for t in tensors]


def fp64_leaves(*tensors):
    """fp64 copies, so the fp64 reference's gradients are not rounded back to the inputs' dtype."""
    return [None if t is None else t.detach().double().requires_grad_() for t in tensors]


def assert_close_to_plain(out, ref, ref64, names):
    for o, r, r64, name in zip(out, ref, ref64, names):
        if o.dtype != torch.float32:  # fp32 copies: reference_check's bf16 rule is for Triton's interpreter only
            o, r = o.float(), r.float()
        assert_matches_reference(o, r, r64, name)


# (shape of the tokens, hidden, vocab, chunk_size, tile_elements, bias, softcap): vocab 101 is no multiple of the
# chunk; 3 x 13 tokens with the last 4 of each row padding; a chunk of 64 > 39 tokens; backward vocabulary blocks
# of 300 // 29 = 10 rows (29 trained tokens of 39 on average), the last one 1 row.
CASES = {
    "chunks, bias": ((3, 13), 24, 101, 8, 300, True, None),
    "chunk above the token count, softcap": ((39,), 24, 101, 64, 64 * 101, False, 5.0),
}


@pytest.mark.parametrize("device", devices())
@pytest.mark.parametrize("kernel", [False, True], ids=["pytorch", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("case", CASES, ids=list(CASES))
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_equals_the_plain_loss_and_gradients(device, kernel, dtype, case, reduction):
    if kernel and not kernel_available(torch.device(device)):
        pytest.skip("Triton cannot run on this device here")
    shape, hidden_size, vocab, chunk, tile, bias, softcap = CASES[case]
    hidden, weight, b, labels = make_inputs(shape, hidden_size, vocab, dtype, bias=bias, device=device)
    if len(shape) == 2:
        labels[:, -4:] = IGNORE  # right padding
    kw = dict(softcap=softcap, reduction=reduction)
    out = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, chunk_size=chunk, tile_elements=tile,
                         kernel=kernel, **kw)
    ref = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels, **kw)
    ref64 = loss_and_grads(linear_cross_entropy_reference, *fp64_leaves(hidden, weight, b), labels, upcast=True, **kw)
    assert_close_to_plain(out, ref, ref64, ["loss", "grad hidden", "grad weight", "grad bias"])
    assert out[1].dtype == dtype and out[2].dtype == dtype


def test_autocast_casts_like_nn_linear():
    hidden, weight, b, labels = make_inputs((29,), 16, 67, torch.float32, bias=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels, chunk_size=5, tile_elements=200)
        ref = loss_and_grads(linear_cross_entropy_reference, hidden, weight, b, labels)
    rounded = [t.bfloat16() for t in (hidden, weight, b)]  # what autocast feeds the matmul
    ref64 = loss_and_grads(linear_cross_entropy_reference, *fp64_leaves(*rounded), labels, upcast=True)
    assert_close_to_plain(out, ref, ref64, ["loss", "grad hidden", "grad weight", "grad bias"])
    assert all(g.dtype == torch.float32 for g in out[1:])  # the fp32 leaves get fp32 gradients, as with autocast


def test_tied_weight_gets_both_gradients():
    """A head tied to the input embedding: the gradient from the loss adds to the embedding's."""
    gen = torch.Generator().manual_seed(1)
    shared = torch.randn(53, 12, generator=gen, requires_grad=True)
    ids = torch.randint(0, 53, (2, 9), generator=gen)
    grads = []
    for loss_fn, kw in ((causal_lm_cross_entropy, dict(chunk_size=4, tile_elements=40)), (None, {})):
        shared.grad = None
        hidden = torch.tanh(torch.nn.functional.embedding(ids, shared))
        if loss_fn is None:
            loss = linear_cross_entropy_reference(hidden[:, :-1], shared, ids[:, 1:])
        else:
            loss = loss_fn(hidden, shared, ids, **kw)
        loss.backward()
        grads.append(shared.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-5, atol=1e-6)
    assert grads[0][ids[:, 0]].abs().sum() > 0  # rows reached only through the embedding


def test_causal_helper_matches_hugging_face_loss():
    """Shifted labels, mean over non-ignored tokens, and HF's num_items_in_batch (sum / count)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1)
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 97, (2, 11))
    labels = ids.clone()
    labels[0, :4] = IGNORE  # a prompt
    labels[1, -3:] = IGNORE  # padding
    with torch.no_grad():
        hidden = model.model(input_ids=ids).last_hidden_state
        head = model.get_output_embeddings().weight
        hf_mean = model(input_ids=ids, labels=labels).loss
        hf_items = model(input_ids=ids, labels=labels, num_items_in_batch=torch.tensor(40)).loss
        ours = causal_lm_cross_entropy(hidden, head, labels, reduction="mean", chunk_size=3)
        ours_sum = causal_lm_cross_entropy(hidden, head, labels, chunk_size=3)
    torch.testing.assert_close(ours, hf_mean, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours_sum / 40, hf_items, rtol=1e-6, atol=0)


def test_all_tokens_ignored():
    hidden, weight, b, labels = make_inputs((7,), 8, 19, torch.float32, bias=True)
    labels[:] = IGNORE
    loss, g_hidden, g_weight, g_bias = loss_and_grads(linear_cross_entropy, hidden, weight, b, labels)
    assert loss == 0 and not g_hidden.any() and not g_weight.any() and not g_bias.any()
    assert torch.isnan(linear_cross_entropy(hidden, weight, labels, reduction="mean"))  # as F.cross_entropy


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(labels=torch.tensor([0, 19, 2])), r"labels must be in \[0, 19\) or -100"),
        (dict(labels=torch.tensor([0, 1])), "labels .* leading shape"),
        (dict(weight=torch.zeros(19, 5)), "does not match weight"),
        (dict(bias=torch.zeros(18)), r"bias \(18,\) must be \[vocab\]"),
        (dict(softcap=0.0), "softcap must be > 0"),
        (dict(chunk_size=0), "chunk_size and tile_elements must be >= 1"),
        (dict(reduction="none"), "reduction must be one of"),
        (dict(kernel=True, hidden=torch.zeros(3, 8, device="meta")), "kernel=True needs Triton and a CUDA tensor"),
    ],
)
def test_bad_input_is_named(change, message):
    args = dict(hidden=torch.zeros(3, 8), weight=torch.zeros(19, 8), labels=torch.tensor([0, 1, 2]))
    args.update(change)
    with pytest.raises(ValueError, match=message):
        linear_cross_entropy(**args)


class LargestAllocation(TorchDispatchMode):
    """Bytes of the largest tensor any op creates (views excluded), forward and backward."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and not t._is_view():
                self.largest = max(self.largest, t.untyped_storage().nbytes())
        return out


def largest_head_tensor(loss_fn, tokens, hidden_size, vocab, **kw):
    hidden, weight, _, labels = make_inputs((tokens,), hidden_size, vocab, torch.float32, bias=False)
    labels[labels == IGNORE] = 0
    with LargestAllocation() as mode:
        loss_fn(hidden, weight, labels, **kw).backward()
    return mode.largest


def test_head_temporaries_scale_with_the_tile_not_tokens_times_vocab():
    """The plain loss allocates tokens x vocab fp32 logits (and their gradient); the chunked loss allocates at most one
    tile (here 8k entries, 32 KB) or the weight's gradient (vocab x hidden), whatever the token count."""
    hidden_size, vocab, tile = 8, 500, 1 << 13
    weight_bytes = vocab * hidden_size * 4
    for tokens in (128, 512):
        plain = largest_head_tensor(linear_cross_entropy_reference, tokens, hidden_size, vocab)
        chunked = largest_head_tensor(linear_cross_entropy, tokens, hidden_size, vocab, tile_elements=tile)
        assert plain >= tokens * vocab * 4
        assert chunked <= max(tile * 4, weight_bytes), (tokens, chunked)


def test_benchmark_runs_at_a_tiny_size(tmp_path):
    from benchmarks import bench_linear_cross_entropy as module

    assert module.main(["--tokens", "64", "--vocab", "300", "--hidden", "8", "--results-dir", str(tmp_path)]) == 0
    result = json.loads(next(tmp_path.glob("bench_linear_cross_entropy-*.json")).read_text())
    plain, chunked = result["rows"]
    assert plain["peak_MiB"] > 0 and chunked["peak_MiB"] > 0 and result["loss_difference"] < 1e-3
