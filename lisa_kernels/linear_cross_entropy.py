"""Cross-entropy of a linear LM head without the whole logits: plain PyTorch reference -> chunked autograd Function.

The plain loss builds ``tokens x vocab`` fp32 logits (0.5 GB at 1024 tokens x 128k vocabulary), then log-softmax
and backward copies of the same size. Here the logits exist one tile at a time:

- forward, per chunk of ``chunk_size`` tokens: the chunk's logits (``chunk_size x vocab``), their log-sum-exp, the
  chunk's loss and, in the same pass, the gradient for the hidden states, ``(softmax - onehot) @ weight``: one
  matmul over the whole vocabulary per token, rounded once, as autograd does for the plain loss;
- backward, per block of vocabulary rows (as many as make a tile of the same size over all tokens): the block's
  logits again, from the saved log-sum-exp, and the gradient for those weight (and bias) rows: one matmul over all
  tokens, written straight into the gradient, rounded once.

Gradients are therefore exact to the rounding of the plain loss (in bf16 the hidden states' gradient is rounded
once more, when the backward scales it by the loss's incoming gradient), and nothing of size ``vocab x hidden`` is
allocated beyond the weight's gradient itself. The price is one more ``tokens x hidden x vocab``
matmul than the plain loss (4 instead of 3: the backward recomputes each logits tile once). Accumulating the weight
gradient over token chunks instead would avoid that recomputation but would need a ``vocab x hidden`` fp32
accumulator (2.1 GB for Llama-3-8B's head, 4x the logits it saves) or would round bf16 partial sums once per chunk.

This is plain chunked PyTorch, not a Triton kernel: the memory goal needs only the tiling; the matmuls, which
dominate the time, are cuBLAS's either way. What a fused kernel would save is the elementwise passes over each tile.
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
# Tokens x vocabulary entries of one fp32 logits tile: 2**25 is 128 MB, 256 tokens of a 128k vocabulary or 1024
# of a 32k one, against 0.5 GB for the whole logits of 1024 tokens x 128k.
DEFAULT_TILE_ELEMENTS = 1 << 25
REDUCTIONS = ("sum", "mean")


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
    """In place: a tile of whole rows of logits -> their softmax; returns the rows' log-sum-exp. No second tile:
    ``torch.logsumexp`` would allocate two."""
    peak = logits.amax(1, keepdim=True)
    sums = logits.sub_(peak).exp_().sum(1, keepdim=True)
    logits.div_(sums)
    return (peak + sums.log()).squeeze(1)


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


def _token_chunk(hidden, weight, bias, labels, softcap, grad_hidden):
    """Forward over one chunk of tokens (whole rows of logits): returns their log-sum-exp and summed loss, and
    writes their hidden-state gradient into ``grad_hidden`` unless it is None. A function of its own so that the
    tile is freed before the next one is allocated."""
    logits, tanh = _capped_logits(hidden, weight, bias, softcap)
    target = logits.gather(1, labels[:, None]).squeeze(1)
    lse = _softmax_(logits)
    if grad_hidden is not None:
        grad = _logits_grad_(logits, tanh, labels, 0)
        torch.matmul(grad.to(weight.dtype), weight, out=grad_hidden)
    return lse, (lse - target).sum()


def _vocab_block(hidden, weight, bias, labels, lse, softcap, first, grad_loss, grad_weight, grad_bias):
    """Backward over one block of vocabulary rows starting at ``first``, all tokens: writes the block's weight and
    bias gradients (either may be None)."""
    logits, tanh = _capped_logits(hidden, weight, bias, softcap)
    grad = _logits_grad_(logits.sub_(lse[:, None]).exp_(), tanh, labels, first, scale=grad_loss)
    if grad_weight is not None:
        torch.matmul(grad.T.to(hidden.dtype), hidden, out=grad_weight)
    if grad_bias is not None:
        grad_bias.copy_(grad.sum(0))


class ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Summed cross-entropy of ``hidden @ weight.T + bias`` over tokens whose labels are all valid class indices.

    ``hidden``: ``[tokens, hidden]``; ``labels``: ``[tokens]`` in ``[0, vocab)``; ``grad_hidden_needed``: compute the
    hidden states' gradient in the forward pass (False under ``no_grad`` or when they need none).
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, softcap, chunk_size, tile_elements, grad_hidden_needed):
        tokens, vocab = hidden.shape[0], weight.shape[0]
        lse = torch.empty(tokens, dtype=torch.float32, device=hidden.device)
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        grad_hidden = torch.empty_like(hidden) if grad_hidden_needed else None
        for start in range(0, tokens, chunk_size):
            rows = slice(start, start + chunk_size)
            lse[rows], chunk_loss = _token_chunk(hidden[rows], weight, bias, labels[rows], softcap,
                                                 None if grad_hidden is None else grad_hidden[rows])
            loss += chunk_loss
        ctx.save_for_backward(hidden, weight, bias, labels, lse, grad_hidden)
        ctx.softcap = softcap
        # Backward tiles span all tokens, so they get as many vocabulary rows as keep them the forward chunk's size.
        ctx.vocab_block = max(1, min(vocab, tile_elements // max(1, tokens)))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        hidden, weight, bias, labels, lse, grad_hidden = ctx.saved_tensors
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        if needs_hidden:  # scaled in fp32, then rounded once (a bf16 copy of grad_loss would be off by up to 2**-9)
            grad_hidden = (grad_hidden.float() * grad_loss).to(grad_hidden.dtype)
        grad_weight = torch.empty_like(weight) if needs_weight else None
        grad_bias = torch.empty_like(bias) if needs_bias else None
        if needs_weight or needs_bias:
            for first in range(0, weight.shape[0], ctx.vocab_block):
                block = slice(first, first + ctx.vocab_block)
                _vocab_block(hidden, weight[block], None if bias is None else bias[block], labels, lse, ctx.softcap,
                             first, grad_loss, None if grad_weight is None else grad_weight[block],
                             None if grad_bias is None else grad_bias[block])
        return (grad_hidden if needs_hidden else None), grad_weight, grad_bias, None, None, None, None, None


def linear_cross_entropy(hidden, weight, labels, bias=None, *, softcap=None, ignore_index=IGNORE_INDEX,
                         reduction="sum", chunk_size=None, tile_elements=DEFAULT_TILE_ELEMENTS):
    """``F.cross_entropy(hidden @ weight.T + bias, labels)`` without the whole logits; same value and gradients.

    ``hidden``: ``[..., hidden]``; ``labels``: ``[...]`` (``ignore_index`` entries are left out before any matmul);
    ``weight``: ``[vocab, hidden]``, which may be the input embedding's (a tied head: the gradient adds to it).
    ``softcap``: Gemma-2's final-logit soft-cap. ``reduction``: ``"sum"`` or ``"mean"`` over the non-ignored
    tokens. ``chunk_size``: tokens per forward tile (default: as many as fit ``tile_elements`` logits). Under
    autocast, hidden, weight and bias are cast to the autocast dtype as ``nn.Linear`` would cast them.
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
                                               torch.is_grad_enabled() and hidden.requires_grad)
    return loss if reduction == "sum" else loss / labels.numel()


def causal_lm_cross_entropy(hidden, weight, labels, bias=None, **kwargs):
    """Next-token loss of a causal LM, as Hugging Face computes it: position t predicts ``labels[:, t + 1]``.

    ``hidden``: the decoder's final hidden states ``[batch, seq, hidden]``; ``labels``: ``[batch, seq]``, the
    input ids with ``ignore_index`` where no loss is wanted. Keyword arguments as :func:`linear_cross_entropy`
    (``reduction="mean"`` is Hugging Face's mean over the non-ignored tokens; with ``"sum"``, divide by the
    trained-token count of all accumulated micro-batches, HF's ``num_items_in_batch``).
    """
    return linear_cross_entropy(hidden[:, :-1], weight, labels[:, 1:], bias, **kwargs)
