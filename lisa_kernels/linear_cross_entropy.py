"""Cross-entropy of a linear LM head without the whole logits: plain PyTorch reference -> chunked autograd Function.

The plain loss builds ``tokens x vocab`` fp32 logits (0.5 GB at 1024 tokens x 128k vocabulary), then log-softmax
and backward copies of the same size. Here the logits exist one tile at a time:

- forward, per chunk of ``chunk_size`` tokens: the chunk's logits (``chunk_size x vocab``), their softmax stats, the
  chunk's loss and, in the same pass, the gradient for the hidden states, ``(softmax - onehot) @ weight``: one
  matmul over the whole vocabulary per token, rounded once, as autograd does for the plain loss;
- backward, per block of vocabulary rows (as many as make a tile of the same size over all tokens): the block's
  logits again, from the saved softmax stats, and the gradient for those weight (and bias) rows: one matmul over all
  tokens, written straight into the gradient, rounded once.

Gradients are therefore exact to the rounding of the plain loss (in bf16 the hidden states' gradient is rounded
once more, when the backward scales it by the loss's incoming gradient), and nothing of size ``vocab x hidden`` is
allocated beyond the weight's gradient itself. The price is one more ``tokens x hidden x vocab`` matmul than the
plain loss (4 instead of 3: the backward recomputes each logits tile once). Accumulating the weight gradient over
token chunks instead would avoid that recomputation but would need a ``vocab x hidden`` fp32 accumulator (2.1 GB
for Llama-3-8B's head, 4x the logits it saves) or would round bf16 partial sums once per chunk.

The matmuls are torch's (cuBLAS's on a GPU). What happens between them, on each tile, has two paths, chosen by
the ``kernel`` argument: plain PyTorch (the default: in-place ops on an fp32 copy of the tile, about eight passes
over it) or ``_cross_entropy_rows_kernel``, a Triton kernel that reads the tile in the matmul's dtype twice
(log-sum-exp, then gradient) and writes the gradient over it in place, so a bf16 tile needs no fp32 copy. The
kernel has been checked only through Triton's interpreter on CPU: it stays opt-in until a GPU run measures it.
"""

import contextlib

import torch
import torch.nn.functional as F

from ._triton import INTERPRETED, tl, triton

IGNORE_INDEX = -100
# Tokens x vocabulary entries of one fp32 logits tile: 2**25 is 128 MB, 256 tokens of a 128k vocabulary or 1024
# of a 32k one, against 0.5 GB for the whole logits of 1024 tokens x 128k.
DEFAULT_TILE_ELEMENTS = 1 << 25
REDUCTIONS = ("sum", "mean")
# _STATS: a token's "softmax stats" are its row maximum and the log of the sum of exp(logit - maximum), kept apart
# rather than added into one log-sum-exp. The loss is then (maximum - target) + log_sum, as F.cross_entropy computes
# it, and the kernel's gradient exp((logit - maximum) - log_sum): a log-sum-exp rounded to fp32 puts one relative
# error of ulp(lse) into every probability of a row, and the weight gradient's matmul adds those up (the kernel's
# weight gradient was 2.7x the plain loss's fp64 error at vocabulary 101 that way, 1.0x this way). The PyTorch path
# subtracts their sum in one in-place pass over the tile instead of two; its error stays within the tests' bound
# (twice the plain loss's, plus one ulp of the largest value).
# Columns a program handles per loop iteration: 4096 fp32 are 16 per thread at 8 warps. Triton's interpreter costs
# ~1 ms per program and loop iteration, so it gets whole rows of the small test vocabularies.
_CUDA_BLOCK = 4096
_CUDA_WARPS = 8
_INTERPRETER_BLOCK = 1 << 14

if triton is not None:

    @triton.jit
    def _tanh(x):
        # From the sigmoid every Triton backend has; absolute error ~1e-7, which is what soft-capped logits need.
        return 2 * tl.sigmoid(2 * x) - 1

    @triton.jit
    def _cross_entropy_rows_kernel(
        logits,  # [rows, n_cols] (row_stride apart), the matmul's dtype; the gradient is written over it
        labels,  # int64 [rows]: class of each row, counted from column 0 of the whole vocabulary
        stats,  # float32 [rows, 2]: `softmax stats`, written with FORWARD, read otherwise
        losses,  # float32 [rows]: log-sum-exp - target logit, written with FORWARD
        scale,  # float32 [1]: factor of the gradient (the loss's incoming gradient)
        n_cols,
        row_stride,
        first_column,  # vocabulary index of the tile's column 0
        softcap,
        SOFTCAP: tl.constexpr,
        FORWARD: tl.constexpr,
        WRITE_GRAD: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        logits += row * row_stride
        label = tl.load(labels + row) - first_column
        cols = tl.arange(0, BLOCK)
        if FORWARD:  # online log-sum-exp over whole rows: a running maximum and the sum scaled to it
            peak = tl.full([], float("-inf"), tl.float32)
            total = tl.full([], 0.0, tl.float32)
            for start in range(0, n_cols, BLOCK):
                mask = start + cols < n_cols
                x = tl.load(logits + start + cols, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    x = softcap * _tanh(x / softcap)
                x = tl.where(mask, x, float("-inf"))  # after the cap, which would turn -inf into -softcap
                new_peak = tl.maximum(peak, tl.max(x, 0))
                total = total * tl.exp(peak - new_peak) + tl.sum(tl.exp(x - new_peak), 0)
                peak = new_peak
            log_sum = tl.log(total)
            tl.store(stats + 2 * row, peak)
            tl.store(stats + 2 * row + 1, log_sum)
            target = tl.load(logits + label).to(tl.float32)
            if SOFTCAP:
                target = softcap * _tanh(target / softcap)
            tl.store(losses + row, (peak - target) + log_sum)
        else:
            peak = tl.load(stats + 2 * row)
            log_sum = tl.load(stats + 2 * row + 1)
        if WRITE_GRAD:
            grad_scale = tl.load(scale)
            for start in range(0, n_cols, BLOCK):
                offsets = start + cols
                mask = offsets < n_cols
                x = tl.load(logits + offsets, mask=mask, other=0.0).to(tl.float32)
                if SOFTCAP:
                    tanh = _tanh(x / softcap)
                    x = softcap * tanh
                grad = tl.exp((x - peak) - log_sum)
                grad = tl.where(offsets == label, grad - 1.0, grad) * grad_scale
                if SOFTCAP:
                    grad = grad * (1 - tanh * tanh)
                tl.store(logits + offsets, grad.to(logits.dtype.element_ty), mask=mask)


def kernel_available(device: torch.device) -> bool:
    """Whether ``kernel=True`` can run on tensors of this device."""
    return triton is not None and device.type == ("cpu" if INTERPRETED else "cuda")


def cross_entropy_rows_(logits, labels, *, stats=None, scale=None, first_column=0, softcap=None, write_grad=True):
    """Launch ``_cross_entropy_rows_kernel`` on a tile of logits (rows = tokens), in place.

    Without ``stats`` (whole rows): returns the rows' softmax stats and losses, and writes the gradient of their
    summed loss over ``logits`` if ``write_grad``. With ``stats`` (a block of columns starting at vocabulary index
    ``first_column``): writes the gradient times ``scale`` over ``logits``; returns None.
    """
    rows, n_cols = logits.shape
    forward = stats is None
    if forward:
        stats = torch.empty(rows, 2, dtype=torch.float32, device=logits.device)
    losses = torch.empty(rows if forward else 0, dtype=torch.float32, device=logits.device)
    scale = torch.ones(1, device=logits.device) if scale is None else scale.float().reshape(1)
    block = _INTERPRETER_BLOCK if INTERPRETED else _CUDA_BLOCK
    if rows == 0:
        return (stats, losses) if forward else None
    with torch.cuda.device(logits.device) if logits.device.type == "cuda" else contextlib.nullcontext():
        _cross_entropy_rows_kernel[(rows,)](
            logits, labels, stats, losses, scale, n_cols, logits.stride(0), first_column, softcap or 1.0,
            SOFTCAP=softcap is not None, FORWARD=forward, WRITE_GRAD=write_grad,
            BLOCK=min(block, triton.next_power_of_2(n_cols)), num_warps=_CUDA_WARPS,
        )
    return (stats, losses) if forward else None


def linear_cross_entropy_reference(hidden, weight, labels, bias=None, *, softcap=None, ignore_index=IGNORE_INDEX,
                                   reduction="sum", upcast=False):
    """The plain loss: whole logits ``hidden @ weight.T + bias`` (in the inputs' dtype, as ``nn.Linear`` computes
    them), in fp32 (``upcast``: fp64), soft-capped to ``softcap * tanh(logits / softcap)`` if given, then
    ``F.cross_entropy``. ``hidden``: ``[..., hidden]``, ``labels``: ``[...]``."""
    compute = torch.float64 if upcast else torch.float32
    if upcast:
        hidden, weight = hidden.double(), weight.double()
        bias = None if bias is None else bias.double()
    logits = F.linear(hidden, weight, bias).to(compute)
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=ignore_index, reduction=reduction)


def _capped_logits(hidden, weight, bias, softcap):
    """fp32 logits of a tile, and tanh(logits / softcap) (or None) for the soft-cap's derivative."""
    logits = F.linear(hidden, weight, bias).float()
    if softcap is None:
        return logits, None
    tanh = logits.div(softcap).tanh_()
    return torch.mul(tanh, softcap, out=logits), tanh


def _softmax_(logits):
    """In place: a tile of whole rows of logits -> their softmax; returns the rows' softmax stats. No second tile:
    ``torch.logsumexp`` would allocate two."""
    peak = logits.amax(1, keepdim=True)
    sums = logits.sub_(peak).exp_().sum(1, keepdim=True)
    logits.div_(sums)
    return torch.cat([peak, sums.log_()], dim=1)


def _logits_grad_(probs, tanh, labels, first_column, scale=None):
    """In place: a tile's softmax -> gradient of the summed loss w.r.t. the tile's pre-cap logits,
    ``(softmax - onehot(labels)) * scale * d(softcap)``. Labels outside ``[first_column, first_column + width)``
    belong to other tiles."""
    grad = probs
    local = labels - first_column
    in_tile = (local >= 0) & (local < grad.shape[1])
    # Adds -1 at each label in the tile and -0.0 (no change) elsewhere: no host sync, unlike selecting the rows.
    grad.scatter_add_(1, local.clamp(0, grad.shape[1] - 1)[:, None], -in_tile[:, None].to(grad.dtype))
    if scale is not None:
        grad.mul_(scale)
    if tanh is not None:
        grad.mul_(1 - tanh.square_())
    return grad


def _token_chunk(hidden, weight, bias, labels, softcap, grad_hidden, kernel):
    """Forward over one chunk of tokens (whole rows of logits): returns their log-sum-exp and summed loss, and
    writes their hidden-state gradient into ``grad_hidden`` unless it is None. A function of its own so that the
    tile is freed before the next one is allocated."""
    if kernel:
        logits = F.linear(hidden, weight, bias)
        stats, losses = cross_entropy_rows_(logits, labels, softcap=softcap, write_grad=grad_hidden is not None)
        if grad_hidden is not None:
            torch.matmul(logits, weight, out=grad_hidden)
        return stats, losses.sum()
    logits, tanh = _capped_logits(hidden, weight, bias, softcap)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    stats = _softmax_(logits)
    if grad_hidden is not None:
        grad = _logits_grad_(logits, tanh, labels, 0)
        torch.matmul(grad.to(weight.dtype), weight, out=grad_hidden)
    return stats, ((stats[:, 0] - target) + stats[:, 1]).sum()


def _vocab_block(hidden, weight, bias, labels, stats, softcap, first, grad_loss, grad_weight, grad_bias, kernel):
    """Backward over one block of vocabulary rows starting at ``first``, all tokens: writes the block's weight and
    bias gradients (either may be None)."""
    if kernel:
        grad = F.linear(hidden, weight, bias)
        cross_entropy_rows_(grad, labels, stats=stats, scale=grad_loss, first_column=first, softcap=softcap)
    else:
        logits, tanh = _capped_logits(hidden, weight, bias, softcap)
        probs = logits.sub_(stats[:, :1] + stats[:, 1:]).exp_()  # one pass over the tile, not two (see _STATS)
        grad = _logits_grad_(probs, tanh, labels, first, scale=grad_loss)
    if grad_weight is not None:
        torch.matmul(grad.T.to(hidden.dtype), hidden, out=grad_weight)
    if grad_bias is not None:
        grad_bias.copy_(grad.sum(0, dtype=torch.float32))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` over tokens whose labels are all valid class indices.

    ``hidden``: ``[tokens, hidden]``; ``labels``: ``[tokens]`` in ``[0, vocab)``; ``grad_hidden_needed``: compute the
    hidden states' gradient in the forward pass (False under ``no_grad`` or when they need none).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, chunk_size, tile_elements, grad_hidden_needed, kernel):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        stats = torch.empty(tokens, 2, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
        for start in range(0, tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            stats[rows], chunk_loss = _token_chunk(hidden[rows], weight, bias, labels[rows], softcap,
                                                 None if grad_hidden is None else grad_hidden[rows], kernel)
            loss += chunk_loss
        ctx.save_for_backward(hidden, weight, bias, labels, stats, grad_hidden)
        ctx.softcap, ctx.kernel = softcap, kernel
        # Backward tiles span all tokens, so they get as many vocabulary rows as keep them the forward chunk's size.
        ctx.vocab_block = max(1, min(vocab, tile_elements // max(1, tokens)))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, stats, grad_hidden = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if needs_hidden:  # scaled in fp32, then rounded once (a bf16 copy of grad_loss would be off by up to 2**-9)
            grad_hidden = (grad_hidden.float() * grad_loss).to(grad_hidden.dtype)
        grad_weight = torch.empty_like(weight) if needs_weight else None
        grad_bias = torch.empty_like(bias) if needs_bias else None
        if needs_weight or needs_bias:
            for first in range(0, weight.shape[0], ctx.vocab_block):
                block = slice(first, first + ctx.vocab_block)
                _vocab_block(hidden, weight[block], None if bias is None else bias[block], labels, stats, ctx.softcap,
                             first, grad_loss, None if grad_weight is None else grad_weight[block],
                             None if grad_bias is None else grad_bias[block], ctx.kernel)
        return (grad_hidden if needs_hidden else None), grad_weight, grad_bias, None, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, bias=None, *, softcap=None, ignore_index=IGNORE_INDEX,
                         reduction="sum", chunk_size=None, tile_elements=DEFAULT_TILE_ELEMENTS, kernel=False):
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without the whole logits; same value and gradients.

    ``hidden``: ``[..., hidden]``; ``labels``: ``[...]`` (``ignore_index`` entries are left out before any matmul);
    ``weight``: ``[vocab, hidden]``, which may be the input embedding's (a tied head: the gradient adds to it).
    ``softcap``: Gemma-2's final-logit soft-cap. ``reduction``: ``"sum"`` or ``"mean"`` over the non-ignored
    tokens. ``chunk_size``: tokens per forward tile (default: as many as fit ``tile_elements`` logits). Under
    autocast, hidden, weight and bias are cast to the autocast dtype as ``nn.Linear`` would cast them. ``kernel``:
    the Triton kernel between the matmuls instead of PyTorch ops (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"linear_cross_entropy: reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if weight.dim() != 2 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"linear_cross_entropy: hidden {tuple(hidden.shape)} does not match weight "
                         f"{tuple(weight.shape)} (expected [..., {weight.shape[-1]}] and [vocab, {weight.shape[-1]}])")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"linear_cross_entropy: labels {tuple(labels.shape)} must have hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    if bias is not None and bias.shape != weight.shape[:1]:
        raise ValueError(f"linear_cross_entropy: bias {tuple(bias.shape)} must be [vocab] = [{weight.shape[0]}]")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"linear_cross_entropy: softcap must be > 0 or None, got {softcap!r}")
    if chunk_size is not None and chunk_size < 1 or tile_elements < 1:
        raise ValueError(f"linear_cross_entropy: chunk_size and tile_elements must be >= 1, "
                         f"got {chunk_size!r}, {tile_elements!r}")
    if kernel and not kernel_available(hidden.device):
        raise ValueError(f"linear_cross_entropy: kernel=True needs Triton and a CUDA tensor (or TRITON_INTERPRET=1 "
                         f"set before import for CPU tensors); got a {hidden.device.type} tensor"
                         f"{'' if triton is not None else ' and no Triton'}")
    vocab = weight.shape[0]
    keep = (labels != ignore_index).flatten().nonzero().squeeze(1)
    hidden = hidden.flatten(0, -2).index_select(0, keep)
    labels = labels.flatten().index_select(0, keep)
    if labels.numel() and not (0 <= int(labels.min()) and int(labels.max()) < vocab):
        raise ValueError(f"linear_cross_entropy: labels must be in [0, {vocab}) or {ignore_index} (ignored), "
                         f"found {int(labels.min())}..{int(labels.max())}")
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        hidden, weight = hidden.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    chunk_size = chunk_size or max(1, tile_elements // vocab)
    with torch.autocast(device_type, enabled=False):
        loss = ChunkedLinearCrossEntropy.apply(hidden, weight, bias, labels, softcap, chunk_size, tile_elements,
                                               torch.is_grad_enabled() and hidden.requires_grad, kernel)
    return loss if reduction == "sum" else loss / labels.numel()


def causal_lm_cross_entropy(hidden, weight, labels, bias=None, **kwargs):
    """Next-token loss of a causal LM, as Hugging Face computes it: position t predicts ``labels[:, t + 1]``.

    ``hidden``: the decoder's final hidden states ``[batch, seq, hidden]``; ``labels``: ``[batch, seq]``, the
    input ids with ``ignore_index`` where no loss is wanted. Keyword arguments as :func:`linear_cross_entropy`
    (``reduction="mean"`` is Hugging Face's mean over the non-ignored tokens; with ``"sum"``, divide by the
    trained-token count of all accumulated micro-batches, HF's ``num_items_in_batch``).
    """
    return linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], bias, **kwargs)
