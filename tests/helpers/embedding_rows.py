"""What the row-sparse state and sparse-gradient tests share: an embedding's gradients touching a few rows per step,
the same as sparse COO gradients, the run that steps them, and a tiny Llama with a tied or untied embedding."""

import torch
import transformers

from lisa_kernels import FusedAdamW

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


def tiny_llama(tied: bool):
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=48, max_position_embeddings=16,
                                      tie_word_embeddings=tied)
    return transformers.AutoModelForCausalLM.from_config(config)
