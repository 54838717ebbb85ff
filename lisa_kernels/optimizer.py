"""FusedAdamW: a drop-in torch.optim.AdamW that updates only the parameters with a gradient, in fused launches."""

import torch

from . import sparse_rows
from .adamw import AdamWHyperparameters, bucket_tensors, skip_step, update_buckets
from .state_parking import StateParker, saved_ids_and_params

_HALF_DTYPES = (torch.bfloat16, torch.float16)
_MOMENT_KEYS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq")
_STATE_DTYPES = (None, torch.float32, torch.bfloat16)


def local_tensor(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 (DTensor) parameter or gradient, which shares its storage; other tensors as
    they are. Moments are kept per shard, so each rank steps and parks only its own share."""
    to_local = getattr(t, "to_local", None)
    return to_local() if callable(to_local) else t


def _moment_like(param: torch.Tensor, saved: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A loaded moment as a new tensor in `dtype` on the param's device, laid out like the param (a torch state saved
    in channels_last loads into a contiguous param's layout, so the kernel needs no copies). A moment of another
    shape is kept as it is, for `step()` to refuse with the param named."""
    if saved.shape != param.shape:
        return saved.to(device=param.device, dtype=dtype, copy=True)
    return torch.empty_like(param, dtype=dtype).copy_(saved)


class FusedAdamW(torch.optim.AdamW):
    """torch.optim.AdamW with the same signature, defaults, math, validation and `state_dict` layout, plus:

    - parameters whose `.grad` is None are skipped entirely: no state is created, no byte is read or written, so
      a LISA optimizer built over the whole model holds state only for the layers that have trained;
    - on CUDA one Triton launch per (param, grad, state) dtype combination covers every active tensor of every
      group; on CPU torch's fused CPU kernel does the work (see `lisa_kernels.adamw` for the paths);
    - moments are fp32 for bf16/fp16 params by default (what torch's fused AdamW cannot do), or `state_dtype`
      (None, torch.float32 or torch.bfloat16), for all groups or per group (a param-group key of that name, e.g.
      bf16 moments for the embedding and head, fp32 for the decoder layers);
    - `sparse_rows=True` (for all groups, or a param-group key) keeps moments only for the rows (dim 0) that have
      ever had a nonzero gradient: an input embedding's state shrinks to the tokens the data uses, with results
      bit-identical to dense AdamW (see `lisa_kernels.sparse_rows`; not worth it for a head, whose gradient is
      dense). `state_dict` saves that state in its compact form ("rows" + moments of those rows), which
      FusedAdamW loads back exactly; FusedAdamW also loads torch.optim.AdamW's dense state into it, and a group
      without `sparse_rows` expands compact state to dense at its next step. Such a group also takes a sparse COO
      gradient (`nn.Embedding(sparse=True)`: tokens x hidden values instead of a vocabulary-sized gradient), stepped
      exactly as its dense form; other groups refuse sparse gradients;
    - `stochastic_rounding=True` rounds bf16 params stochastically, so updates below half an ulp are not lost;
    - a `StateParker` (`optimizer.state_parker`) moves frozen params' moments to and from a HostStateBank
      (`state_bank`, or a default one created on first use); see `state_parking.py`. It keeps moments in
      `moment_dtype` when state is loaded straight into the bank.

    Deep copies and pickles, like torch's optimizers, carry the state (parked state included, as device tensors)
    but not hooks: the copy gets a parker of its own with a default bank.

    `fused` (None or True: the Triton kernel on CUDA, torch's fused kernel on CPU) and `foreach` (True, or
    `fused=False`: torch `_foreach` ops) choose the path as in torch.optim.AdamW. `triton_on_cpu=True` runs the
    Triton kernel on CPU tensors through Triton's interpreter (set TRITON_INTERPRET=1 before importing
    lisa_kernels): how the tests check the kernel without a GPU, ~1 ms per 65,536 elements. CUDA-graph capture
    (`capturable`) and `differentiable` are not supported.
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=1e-2, amsgrad=False, *,
                 maximize=False, foreach=None, capturable=False, differentiable=False, fused=None,
                 state_dtype=None, sparse_rows=False, stochastic_rounding=False, state_bank=None,
                 triton_on_cpu=False):
        if capturable:
            raise ValueError("FusedAdamW does not support capturable=True; use torch.optim.AdamW for CUDA graphs")
        if differentiable:
            raise ValueError("FusedAdamW does not support differentiable=True; use torch.optim.AdamW")
        # Before torch's __init__: add_param_group gives every group these two as defaults.
        self.state_dtype = state_dtype
        self.sparse_rows = sparse_rows
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize, foreach=foreach,
                         fused=fused)
        self.triton_on_cpu = triton_on_cpu
        self.stochastic_rounding = stochastic_rounding
        # GradScaler hands us grad_scale / found_inf instead of unscaling the grads itself.
        self._step_supports_amp_scaling = True
        StateParker(self, state_bank, state_dtype=self.moment_dtype)

    def __getstate__(self):
        # torch.optim keeps defaults, state (a parked entry pickles as its tensor) and param_groups; our options too.
        return {**super().__getstate__(), "state_dtype": self.state_dtype, "sparse_rows": self.sparse_rows,
                "stochastic_rounding": self.stochastic_rounding, "triton_on_cpu": self.triton_on_cpu,
                "_step_supports_amp_scaling": True}

    def __setstate__(self, state):
        super().__setstate__(state)
        self._fill_group_options()
        if "state_parker" not in self.__dict__:  # a copy or an unpickled one (torch's load_state_dict comes here too)
            StateParker(self, state_dtype=self.moment_dtype)

    def add_param_group(self, param_group: dict) -> None:
        param_group.setdefault("state_dtype", self.state_dtype)
        param_group.setdefault("sparse_rows", self.sparse_rows)
        if param_group["state_dtype"] not in _STATE_DTYPES:
            raise ValueError(f"Invalid state_dtype: {param_group['state_dtype']} (use None, torch.float32 or "
                             f"torch.bfloat16)")
        if not isinstance(param_group["sparse_rows"], bool):
            raise ValueError(f"Invalid sparse_rows: {param_group['sparse_rows']!r} (use True or False)")
        params = param_group["params"]
        if param_group["sparse_rows"] and any(p.dim() == 0 for p in ([params] if torch.is_tensor(params) else params)):
            raise ValueError("sparse_rows=True needs parameters with rows (at least one dimension)")
        super().add_param_group(param_group)

    def _fill_group_options(self) -> None:
        """Groups unpickled from an older FusedAdamW lack our options."""
        for group in self.param_groups:
            group.setdefault("state_dtype", self.state_dtype)
            group.setdefault("sparse_rows", self.sparse_rows)

    @property
    def state_bank(self):
        """The HostStateBank this optimizer's state parker uses (created on first access when none was given)."""
        return self.state_parker.bank

    def _group_of(self, param: torch.Tensor) -> dict | None:
        return next((g for g in self.param_groups if any(p is param for p in g["params"])), None)

    def moment_dtype(self, param: torch.Tensor, group: dict | None = None) -> torch.dtype:
        """The dtype of `param`'s moments: its group's `state_dtype`, else fp32 for bf16/fp16 params, else the
        param's own."""
        group = group if group is not None else self._group_of(param)
        state_dtype = group["state_dtype"] if group is not None else self.state_dtype
        if state_dtype is not None:
            return state_dtype
        return torch.float32 if param.dtype in _HALF_DTYPES else param.dtype

    def _state_for_step(self, param: torch.Tensor, group: dict) -> dict:
        state = self.state[param]
        local = local_tensor(param)
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
            if group["sparse_rows"]:
                state.update(sparse_rows.empty_state(local, self.moment_dtype(param, group)))
            else:
                # The param's layout (channels_last, transposed), so the kernel walks all of them in the same order.
                state["exp_avg"] = torch.zeros_like(local, dtype=self.moment_dtype(param, group))
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        elif group["sparse_rows"] and sparse_rows.ROWS not in state:
            sparse_rows.compact(state)
        elif not group["sparse_rows"] and sparse_rows.ROWS in state:
            sparse_rows.expand(state, local)
        if group["amsgrad"] and "max_exp_avg_sq" not in state:
            state["max_exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
        return state

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if skip_step(getattr(self, "found_inf", None)):
            return loss
        self._update([(group_index, param_index, group)
                      for group_index, group in enumerate(self.param_groups)
                      for param_index, p in enumerate(group["params"]) if p.grad is not None])
        return loss

    @torch.no_grad()
    def step_param(self, param: torch.Tensor) -> None:
        """Update this one parameter as `step()` would (same path, checks, state creation, sparse rows, stochastic
        rounding, GradScaler's `found_inf`), and nothing else: for updating each tensor as soon as its gradient is
        ready (`lisa_kernels.StepInBackward`). A parameter without a gradient is left alone; parked state comes
        back first (what `step()`'s pre-hook does for every parameter). The optimizer's step hooks do not run,
        and each call is a launch of its own (`step()` covers every tensor of a dtype in one)."""
        where = [(group_index, param_index, group) for group_index, group in enumerate(self.param_groups)
                 for param_index, p in enumerate(group["params"]) if p is param]
        if not where:
            raise ValueError(f"FusedAdamW.step_param: this parameter (shape {tuple(param.shape)}) is in none of "
                             f"the optimizer's param groups")
        if param.grad is None or skip_step(getattr(self, "found_inf", None)):
            return
        self.state_parker.unpark(param)
        self._update(where)

    def _update(self, where: list[tuple[int, int, dict]]) -> None:
        """One AdamW step for the params at these (group index, param index, group), which have gradients."""
        rows, stepped_rows, hyperparameters = [], [], {}
        for group_index, param_index, group in where:
            p = group["params"][param_index]
            if p.grad.layout != torch.strided:  # a row-sparse group steps it (sparse_rows.gather); others refuse
                sparse_rows.check_sparse_gradient(local_tensor(p), p.grad, group["sparse_rows"],
                                                  f"FusedAdamW: parameter {param_index} of param group {group_index}")
            if p.is_complex():
                raise ValueError(f"FusedAdamW does not support complex parameters (got {p.dtype})")
            h = hyperparameters.get(group_index)
            if h is None:
                beta1, beta2 = (float(b) for b in group["betas"])
                h = hyperparameters[group_index] = AdamWHyperparameters(
                    float(group["lr"]), beta1, beta2, group["eps"], group["weight_decay"], group["maximize"])
            state = self._state_for_step(p, group)
            param, grad = local_tensor(p), local_tensor(p.grad)
            if group["sparse_rows"]:  # the rows with state step like any tensor; scattered back below
                param_rows, grad = sparse_rows.gather(state, param, grad, 1 - h.lr * h.weight_decay,
                                                      self.stochastic_rounding)
                stepped_rows.append((state, param, param_rows))
                param = param_rows
            rows.append((param, grad, state["exp_avg"], state["exp_avg_sq"],
                         state["max_exp_avg_sq"] if group["amsgrad"] else None, state["step"], h))
        buckets = bucket_tensors(rows, lambda i: "FusedAdamW: parameter {1} of param group {0}".format(*where[i][:2]))
        update_buckets(buckets, fused=self.defaults["fused"], foreach=self.defaults["foreach"],
                       triton_on_cpu=self.triton_on_cpu, grad_scale=getattr(self, "grad_scale", None),
                       stochastic_rounding=self.stochastic_rounding)
        for state, param, stepped in stepped_rows:
            sparse_rows.scatter(state, param, stepped)

    def load_state_dict(self, state_dict: dict, *, park: str | None = None) -> None:
        """Load a FusedAdamW or torch.optim.AdamW state_dict. The state parker sends frozen params' state straight
        into the state bank, never onto the device; `park` ("frozen" or "all") overrides its `park_on_load` for
        this call.

        torch casts loaded moments to the param dtype; ours keep `moment_dtype` (fp32 for bf16 params), so they are
        re-read from the saved values, and `step` stays a CPU scalar since bias corrections are computed on the host.
        Sparse-row indices (torch casts them to the param dtype too) are re-read as int64. Groups saved without
        `state_dtype` / `sparse_rows` (torch.optim.AdamW) keep the ones they have.
        """
        # A torch.optim.AdamW checkpoint has no state_dtype / sparse_rows: each group keeps its own.
        groups = [{"state_dtype": group["state_dtype"], "sparse_rows": group["sparse_rows"], **saved}
                  for group, saved in zip(self.param_groups, state_dict["param_groups"])]
        state_dict = {**state_dict, "param_groups": groups + state_dict["param_groups"][len(groups):]}
        parker = self.state_parker
        default = parker.park_on_load
        parker.park_on_load = park or default
        try:
            super().load_state_dict(state_dict)
        finally:
            parker.park_on_load = default
        for saved_id, p in saved_ids_and_params(self, state_dict):
            saved = state_dict["state"].get(saved_id)
            if saved is None:
                continue
            state = self.state[p]
            state["step"] = torch.tensor(float(saved["step"]), dtype=torch.float32)
            if sparse_rows.ROWS in saved and not parker.is_parked(p):
                state[sparse_rows.ROWS] = saved[sparse_rows.ROWS].to(device=local_tensor(p).device, dtype=torch.int64)
            for key in _MOMENT_KEYS:
                if key in saved and not parker.is_parked(p):
                    state[key] = _moment_like(local_tensor(p), saved[key], self.moment_dtype(p))
