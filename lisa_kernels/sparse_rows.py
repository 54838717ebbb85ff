"""Row-sparse AdamW state for an input embedding: moments only for the rows that have ever had a gradient.

An embedding row whose gradient has always been zero has zero moments, and dense AdamW moves it to
p * (1 - lr * wd) - lr * 0 / (sqrt(0) / bc2 + eps) = p * (1 - lr * wd): weight decay alone, which needs no state.
So only the rows that have had a nonzero gradient keep moments, a fine-tuning set touching a few percent of a
128k-token vocabulary keeps a few percent of the dense state, and the results are bit-identical to dense AdamW:

- a row enters the state (with zero moments) at the first step its gradient has a nonzero (or NaN) element, and
  stays: once it has moments, its later zero-gradient steps still decay them and move it, as in dense AdamW;
- rows with state are gathered, stepped by the same AdamW path as every other tensor, and written back;
- rows without state get the weight decay alone, computed as every path computes it (fp32 product, one rounding).

The Triton kernel and the foreach path compute each element alike wherever it sits, so they are exact for any row
width; torch's fused CPU kernel uses FMA in its vector lanes and not in its scalar tail (the last numel % 16
elements), so it is exact where rows are a multiple of 16 elements (every LLM hidden size).

A row that enters with zero moments and a zero gradient steps exactly like a row without state, so taking too
many rows (a gradient that underflows to zero after unscaling) is still exact; only a row left out would not be.

The gradient may be dense or sparse COO along dim 0 (`nn.Embedding(sparse=True)`: one row of values per token, a
few MB where the dense gradient of a 128,256 x 4096 bf16 embedding is 1.05 GB). A sparse gradient is coalesced
(rows of repeated tokens summed), its rows with a nonzero element join the state, and the rows with state get its
values (zeros where it has none): the step is bit-identical to the one its dense form `grad.coalesce().to_dense()`
gets (`grad.to_dense()` may sum a row's many entries in another order: 20 entries did, 5 did not).

The state of a parameter `p` in `optimizer.state[p]`, the compact form `state_dict` saves:
    "step": as in torch.optim.AdamW;
    "rows": int64, ascending indices (into dim 0) of the rows with state;
    "exp_avg", "exp_avg_sq" (and "max_exp_avg_sq" with amsgrad): (len(rows), *p.shape[1:]) moments of those rows.
Every entry but `step` is a tensor with a dimension, so a StateParker parks and restores all of them.
"""

import torch

from .adamw import round_to_bfloat16_stochastic

ROWS = "rows"
_MOMENTS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
# Rows decayed per batch of the stateless rows: bounds the fp32 temporary (2^12 rows of 4096 = 64 MiB).
_DECAY_BATCH_ROWS = 1 << 12


def empty_state(param: torch.Tensor, dtype: torch.dtype) -> dict:
    """Moments for no row yet."""
    shape = (0, *param.shape[1:])
    return {ROWS: torch.zeros(0, dtype=torch.int64, device=param.device),
            "exp_avg": torch.zeros(shape, dtype=dtype, device=param.device),
            "exp_avg_sq": torch.zeros(shape, dtype=dtype, device=param.device)}


def touched_rows(grad: torch.Tensor) -> torch.Tensor:
    """Ascending indices of the rows whose gradient has an element that is not zero (NaN included). The count of
    nonzeros (the 0-"norm") is a reduction: `grad != 0` would first write a bool copy of the whole gradient, 0.5 GB
    for a 128,256 x 4096 embedding."""
    nonzeros = torch.linalg.vector_norm(grad.reshape(grad.shape[0], -1), ord=0, dim=1)  # >= 1 stays nonzero
    return nonzeros.nonzero().squeeze(1)


def add_rows(state: dict, rows: torch.Tensor) -> None:
    """Give `rows` zero moments where they have none, keeping the indices ascending."""
    old = state[ROWS]
    merged = torch.unique(torch.cat([old, rows]))
    if merged.numel() == old.numel():
        return
    at = torch.searchsorted(merged, old)
    for key in _MOMENTS:
        if key in state:
            moment = state[key]
            state[key] = moment.new_zeros((merged.numel(), *moment.shape[1:])).index_copy_(0, at, moment)
    state[ROWS] = merged


def compact(state: dict) -> None:
    """Dense moments (a torch.optim.AdamW checkpoint) -> the compact form: rows with any nonzero moment."""
    moments = [state[key] for key in _MOMENTS if key in state]
    rows = torch.stack([m.reshape(m.shape[0], -1).ne(0).any(dim=1) for m in moments]).any(dim=0).nonzero().squeeze(1)
    for key in _MOMENTS:
        if key in state:
            state[key] = state[key].index_select(0, rows)
    state[ROWS] = rows


def expand(state: dict, param: torch.Tensor) -> None:
    """The compact form -> dense moments laid out like `param` (the parameter no longer uses sparse rows)."""
    rows = state.pop(ROWS).to(device=param.device, dtype=torch.int64)
    for key in _MOMENTS:
        if key in state:
            state[key] = torch.zeros_like(param, dtype=state[key].dtype).index_copy_(0, rows, state[key])


def decay_rows_without_state(param: torch.Tensor, rows: torch.Tensor, decay: float,
                             stochastic_rounding: bool) -> None:
    """param[i] *= decay for every row i not in `rows`, in fp32 (fp64 for fp64 params) with one rounding, as the
    AdamW paths compute p * (1 - lr * wd) when the moments and the gradient are zero."""
    if decay == 1.0:
        return
    without = torch.ones(param.shape[0], dtype=torch.bool, device=param.device)
    without[rows] = False
    compute = torch.promote_types(param.dtype, torch.float32)
    for batch in without.nonzero().squeeze(1).split(_DECAY_BATCH_ROWS):
        value = param.index_select(0, batch).to(compute) * decay
        if stochastic_rounding and param.dtype == torch.bfloat16:
            value = round_to_bfloat16_stochastic(value)
        param.index_copy_(0, batch, value.to(param.dtype))


def check_sparse_gradient(param: torch.Tensor, grad: torch.Tensor, row_sparse: bool, where: str) -> None:
    """Refuse (RuntimeError naming the parameter, `where`) a sparse gradient that `gather` cannot take: one in a
    group without row-sparse state, or one that is not a COO tensor of the parameter's shape and device, sparse
    along dim 0 only (what `nn.Embedding(sparse=True)` gives)."""
    if not row_sparse:
        raise RuntimeError(f"{where} has a sparse gradient, which FusedAdamW steps only with row-sparse state: put "
                           f"the parameter in a param group with sparse_rows=True")
    if grad.layout != torch.sparse_coo or grad.sparse_dim() != 1 or grad.shape != param.shape \
            or grad.device != param.device:
        sparse_dims = grad.sparse_dim() if grad.layout == torch.sparse_coo else grad.layout
        raise RuntimeError(f"{where} (shape {tuple(param.shape)} on {param.device}) has a sparse gradient of shape "
                           f"{tuple(grad.shape)} on {grad.device} ({sparse_dims} sparse dims); sparse_rows=True takes "
                           f"a COO gradient of the parameter's shape and device, sparse along dim 0 only")


def _sparse_grad_rows(grad: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows `rows` (ascending) of a coalesced sparse gradient as a dense tensor: its values where it has the row,
    zeros where it has none, as `grad.to_dense().index_select(0, rows)` without the dense gradient."""
    index, values = grad.indices()[0], grad.values()
    grad_rows = values.new_zeros((rows.numel(), *values.shape[1:]))
    if rows.numel() == 0:
        return grad_rows
    at = torch.searchsorted(rows, index).clamp_max_(rows.numel() - 1)
    held = rows[at] == index  # an all-zero row the state does not hold is zero in the step too: it is left out
    return grad_rows.index_copy_(0, at[held], values[held])


def gather(state: dict, param: torch.Tensor, grad: torch.Tensor, decay: float,
           stochastic_rounding: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One step's preparation: rows touched by `grad` join the state, rows without state get their weight decay,
    and the rows with state are returned as (param rows, grad rows) copies for the AdamW step; `scatter` writes
    the stepped param rows back.

    `grad` is dense, or sparse COO along dim 0 (`check_sparse_gradient`), possibly uncoalesced (accumulated over
    micro-batches): it is coalesced (duplicate rows summed), and the step is then the one its dense form gets."""
    if grad.is_sparse:
        grad = grad.coalesce()
        add_rows(state, grad.indices()[0][touched_rows(grad.values())])
    else:
        add_rows(state, touched_rows(grad))
    rows = state[ROWS]
    decay_rows_without_state(param, rows, decay, stochastic_rounding)
    grad_rows = _sparse_grad_rows(grad, rows) if grad.is_sparse else grad.index_select(0, rows)
    return param.index_select(0, rows), grad_rows


def scatter(state: dict, param: torch.Tensor, stepped_rows: torch.Tensor) -> None:
    param.index_copy_(0, state[ROWS], stepped_rows)
