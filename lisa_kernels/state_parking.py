"""Parking optimizer state in a HostStateBank: the LISA hooks of FusedAdamW, kept out of the optimizer's math.

A parked param keeps only its `step` (a CPU scalar) in `optimizer.state[p]`; its moments (exp_avg, exp_avg_sq,
max_exp_avg_sq: every other tensor) live in the bank under a name private to this optimizer. Nothing else in
torch.optim looks at the moments of a param without a grad, so the optimizer works unchanged around them; `step()`
unparks a parked param that has a grad before updating it, `state_dict()` reads parked moments back from the bank
(checkpoints are complete), and `load_state_dict(..., park=...)` can put loaded state straight into the bank without
a trip through the GPU.
"""
from __future__ import annotations

from typing import Iterable

import torch

from .host_state_bank import HostStateBank


def _as_list(params) -> list:
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


def _stays_put(value) -> bool:
    """State that is not worth parking: non-tensors and CPU scalars (`step`)."""
    return not isinstance(value, torch.Tensor) or (value.dim() == 0 and value.device.type == "cpu")


def _complete_state_dict(optimizer, state_dict: dict) -> dict:
    return optimizer._add_parked_state(state_dict)


class StateParkingMixin:
    """Adds park_state / unpark_state / prefetch_state / drop_state to a torch.optim.Optimizer subclass.

    The subclass calls `_init_state_parking(state_bank)` in its constructor (which also hooks `state_dict()`),
    `_unpark_for_step()` at the top of `step()`, and `_split_parked_state` / `_park_loaded` around the body of its
    `load_state_dict`.
    """

    def _init_state_parking(self, state_bank: HostStateBank | None) -> None:
        if state_bank is not None and not isinstance(state_bank, HostStateBank):
            raise TypeError(f"state_bank must be a HostStateBank or None, got {type(state_bank).__name__}")
        self._state_bank = state_bank
        self._parked: dict[torch.Tensor, dict[str, str]] = {}  # param -> {state key: bank name}
        # torch.optim.Optimizer.state_dict() calls this last, so checkpoints include what is parked.
        self.register_state_dict_post_hook(_complete_state_dict)

    @property
    def state_bank(self) -> HostStateBank:
        """The bank parked state lives in; created (default settings) the first time it is needed."""
        if self._state_bank is None:
            self._state_bank = HostStateBank()
        return self._state_bank

    def is_parked(self, param: torch.Tensor) -> bool:
        return param in self._parked

    @property
    def parked_params(self) -> list[torch.Tensor]:
        return list(self._parked)

    def park_state(self, params: Iterable[torch.Tensor] | torch.Tensor) -> None:
        """Move these params' moments into the bank; the device copies are freed (once the copies have read them).
        Params without state, or already parked, are left alone."""
        index = None
        for p in _as_list(params):
            state = self.state.get(p)
            if p in self._parked or not state:
                continue
            if index is None:
                index = self._param_index()
            names = {}
            for key in [k for k, v in state.items() if not _stays_put(v)]:
                names[key] = name = f"opt{id(self):x}/{index[p]}/{key}"
                # pop: the state dict held the last device reference; the caching allocator gets the memory back
                self.state_bank.offload(name, state.pop(key))
            self._parked[p] = names

    def unpark_state(self, params: Iterable[torch.Tensor] | torch.Tensor, non_blocking: bool = True) -> None:
        """Bring these params' parked moments back to each param's device. With `non_blocking` the copies run on
        the bank's copy stream and the current stream waits for them, so a step queued next sees the data."""
        for p in _as_list(params):
            names = self._parked.pop(p, None)
            if names is None:
                continue
            state = self.state[p]
            for key, name in names.items():
                state[key] = self.state_bank.restore(name, p.device, non_blocking=non_blocking)

    def prefetch_state(self, params: Iterable[torch.Tensor] | torch.Tensor) -> None:
        """Start copying these params' parked moments back to their devices; `unpark_state` (or `step`) finishes."""
        for p in _as_list(params):
            for name in self._parked.get(p, {}).values():
                self.state_bank.prefetch(name, p.device)

    def drop_state(self, params: Iterable[torch.Tensor] | torch.Tensor) -> None:
        """Forget these params' state, parked or not (LISA's "reset" policy): their next step starts from zero."""
        for p in _as_list(params):
            for name in self._parked.pop(p, {}).values():
                self.state_bank.discard(name)
            self.state.pop(p, None)

    # ----------------------------------------------------------------- hooks for step / state_dict / load

    def _unpark_for_step(self) -> None:
        if self._parked:
            self.unpark_state([p for p in self._parked if p.grad is not None])

    def _param_index(self) -> dict[torch.Tensor, int]:
        """Param -> its id in state_dict(): position over all groups, in order (torch's numbering)."""
        params = [p for group in self.param_groups for p in group["params"]]
        return {p: i for i, p in enumerate(params)}

    def _add_parked_state(self, state_dict: dict) -> dict:
        """Complete `state_dict` (from torch's state_dict) with CPU copies of the parked moments."""
        if not self._parked:
            return state_dict
        index = self._param_index()
        state = dict(state_dict["state"])  # the inner dicts are the live state: copy, never mutate them
        for p, names in self._parked.items():
            entry = {**state.get(index[p], {}), **{key: self.state_bank.read(name) for key, name in names.items()}}
            # torch.optim.AdamW's key order, so a parked-then-saved state_dict equals a never-parked one.
            first = [k for k in ("step", "exp_avg", "exp_avg_sq", "max_exp_avg_sq") if k in entry]
            state[index[p]] = {k: entry[k] for k in first + [k for k in entry if k not in first]}
        return {**state_dict, "state": state}

    def _split_parked_state(self, state_dict: dict, park) -> tuple[dict, list]:
        """Forget what is parked now (loading replaces all state) and take the state of the params chosen by
        `park` out of `state_dict`: returns (the rest, [(param, saved state)]) for `_park_loaded`.

        park: None (nothing), "frozen" (params with requires_grad=False), or an iterable of params."""
        for names in self._parked.values():
            for name in names.values():
                self.state_bank.discard(name)
        self._parked.clear()
        if park is None:
            return state_dict, []
        params = [p for group in self.param_groups for p in group["params"]]
        chosen = ({p for p in params if not p.requires_grad} if isinstance(park, str) and park == "frozen"
                  else set(_as_list(park)))
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        taken, rest = [], dict(state_dict["state"])
        for saved_id, p in zip(saved_ids, params):
            if p in chosen and saved_id in rest:
                taken.append((p, rest.pop(saved_id)))
        return {**state_dict, "state": rest}, taken

    def _park_loaded(self, taken: list, moment_dtype) -> None:
        """Put loaded state straight into the bank: moments in `moment_dtype(p)`, `step` as a CPU float32 scalar."""
        index = self._param_index()
        for p, saved in taken:
            state = self.state[p]
            names = {}
            for key, value in saved.items():
                if key == "step":
                    state["step"] = torch.tensor(float(value), dtype=torch.float32)
                elif isinstance(value, torch.Tensor):
                    names[key] = name = f"opt{id(self):x}/{index[p]}/{key}"
                    self.state_bank.offload(name, value.to(dtype=moment_dtype(p)))
                else:
                    state[key] = value
            self._parked[p] = names
