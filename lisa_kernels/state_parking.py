"""StateParker: park the optimizer state of frozen parameters in a HostStateBank, for any torch.optim.Optimizer.

A parked entry of `optimizer.state[p]` (every tensor with at least one dimension: AdamW's moments and
max_exp_avg_sq, Adafactor's factored rows and columns, SGD's momentum buffer, an 8-bit optimizer's codes and
scales) is replaced by a `ParkedState` naming its place in the bank; scalars (`step`) and non-tensors stay. torch
optimizers read the state of a parameter only when it has a gradient, and the parker restores a parked parameter
that has one before every step, so the optimizer runs unchanged around the placeholders. Everything else happens
in the optimizer's own hooks:

- `state_dict()` returns parked entries as CPU tensors, in the optimizer's own layout (checkpoints are complete);
- `load_state_dict()` sends the loaded state of frozen parameters (or of all, `park_on_load="all"`) straight
  into the bank, never onto the device;
- `copy.deepcopy(optimizer)` and pickling see real tensors (a `ParkedState` copies and pickles as the tensor);
- when the optimizer goes away, its entries leave the bank (a bank may serve several optimizers).
"""
from __future__ import annotations

import itertools
import weakref
from typing import Callable, Iterable

import torch

from .host_state_bank import HostStateBank

__all__ = ["ParkedState", "StateParker"]

_PARK_ON_LOAD = ("frozen", "all")
_parker_ids = itertools.count()  # bank names stay unique even when an id() is reused by a later optimizer


class ParkedState:
    """Stands in `optimizer.state[p][key]` for a tensor parked in a HostStateBank."""

    __slots__ = ("bank", "name", "device")

    def __init__(self, bank: HostStateBank, name: str, device: torch.device):
        self.bank, self.name, self.device = bank, name, device

    def read(self) -> torch.Tensor:
        """A CPU copy, leaving the tensor parked."""
        return self.bank.read(self.name)

    def materialize(self) -> torch.Tensor:
        """A copy on the tensor's own device, leaving it parked."""
        return self.read().to(self.device)

    def __deepcopy__(self, memo) -> torch.Tensor:
        return self.materialize()

    def __reduce_ex__(self, protocol):
        return self.materialize().__reduce_ex__(protocol)

    def __repr__(self) -> str:
        return f"ParkedState({self.name!r}, device={self.device})"


def saved_ids_and_params(optimizer: torch.optim.Optimizer, state_dict: dict) -> list[tuple[int, torch.Tensor]]:
    """(id in `state_dict`, parameter of `optimizer`) pairs: `optimizer.state_dict()` numbers the parameters in the
    order of its param groups, so a saved state dict's ids map to a live optimizer's parameters by position."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    return list(zip([i for group in state_dict["param_groups"] for i in group["params"]], params))


def _as_list(params) -> list:
    if isinstance(params, torch.Tensor):
        return [params]
    return list(params)


def _parkable(value) -> bool:
    """Tensors worth moving: anything but scalars (`step`, Adafactor's RMS) and non-tensors."""
    return isinstance(value, torch.Tensor) and value.dim() > 0


def _discard_all(bank: HostStateBank, names: set[str]) -> None:
    for name in names:
        bank.discard(name)
    names.clear()


class StateParker:
    """Parks and restores the optimizer state of chosen parameters; see the module docstring.

    Args:
        optimizer: any torch.optim.Optimizer that keeps its state per parameter in `optimizer.state[p]`.
        bank: where parked state lives; None creates a default HostStateBank the first time it is needed.
        state_dtype: the dtype the optimizer keeps a floating state tensor in for a parameter, applied to state
            loaded into the bank (default, as torch's `load_state_dict`: the parameter's dtype).
        park_on_load: which parameters' loaded state `load_state_dict` puts straight into the bank: "frozen"
            (requires_grad=False) or "all" (each parameter's state comes back at its first step).

    Use `StateParker.of(optimizer)` to get the parker already attached to an optimizer (FusedAdamW has one).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, bank: HostStateBank | None = None, *,
                 state_dtype: Callable[[torch.Tensor], torch.dtype] | None = None, park_on_load: str = "frozen"):
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"StateParker needs a torch.optim.Optimizer, got {type(optimizer).__name__}")
        if bank is not None and not isinstance(bank, HostStateBank):
            raise TypeError(f"StateParker: bank must be a HostStateBank or None, got {type(bank).__name__}")
        if isinstance(getattr(optimizer, "state_parker", None), StateParker):
            raise ValueError(f"this {type(optimizer).__name__} already has a StateParker: use "
                             f"StateParker.of(optimizer)")
        self.optimizer = optimizer
        self.state_dtype = state_dtype
        self.park_on_load = park_on_load
        self._bank = None
        self._prefix = f"opt{next(_parker_ids)}"
        self._names: set[str] = set()  # bank names this parker owns
        self._parked: dict[torch.Tensor, None] = {}  # parked params, in parking order
        self._loading: tuple[set[str], list] | None = None
        if bank is not None:
            self._use_bank(bank)
        optimizer.state_parker = self
        optimizer.register_step_pre_hook(self._before_step)
        optimizer.register_state_dict_post_hook(self._complete_state_dict)
        optimizer.register_load_state_dict_pre_hook(self._before_load)
        optimizer.register_load_state_dict_post_hook(self._after_load)

    @classmethod
    def of(cls, optimizer: torch.optim.Optimizer) -> StateParker:
        """The parker attached to `optimizer`, attaching one (default bank) when there is none."""
        parker = getattr(optimizer, "state_parker", None)
        return parker if isinstance(parker, StateParker) else cls(optimizer)

    @property
    def park_on_load(self) -> str:
        return self._park_on_load

    @park_on_load.setter
    def park_on_load(self, value: str) -> None:
        if value not in _PARK_ON_LOAD:
            raise ValueError(f"StateParker: park_on_load must be one of {_PARK_ON_LOAD}, got {value!r}")
        self._park_on_load = value

    @property
    def bank(self) -> HostStateBank:
        """The bank parked state lives in; created (default settings) the first time it is needed."""
        if self._bank is None:
            self._use_bank(HostStateBank())
        return self._bank

    def _use_bank(self, bank: HostStateBank) -> None:
        self._bank = bank
        # When the optimizer goes away its entries leave the bank; the finalizer holds neither it nor this parker.
        weakref.finalize(self.optimizer, _discard_all, bank, self._names).atexit = False  # the process frees it all

    def is_parked(self, param: torch.Tensor) -> bool:
        return param in self._parked

    @property
    def parked_params(self) -> list[torch.Tensor]:
        return list(self._parked)

    def park(self, params: Iterable[torch.Tensor] | torch.Tensor) -> None:
        """Move these params' state tensors into the bank; the device copies are freed (once the copies have read
        them). Params without state, or already parked, are left alone."""
        for p in _as_list(params):
            state = self.optimizer.state.get(p)
            if p in self._parked or not state:
                continue
            keys = [key for key, value in state.items() if _parkable(value)]
            for key in keys:
                # Replacing the entry drops the last device reference: the caching allocator gets it back.
                state[key] = self._offload(p, key, state[key])
            if keys:
                self._parked[p] = None

    def unpark(self, params: Iterable[torch.Tensor] | torch.Tensor, non_blocking: bool = True) -> None:
        """Bring these params' parked state back to each param's device. With `non_blocking` the copies run on the
        bank's copy stream and the current stream waits for them, so a step queued next sees the data."""
        for p in _as_list(params):
            if p not in self._parked:
                continue
            del self._parked[p]
            state = self.optimizer.state[p]
            for key, value in state.items():
                if isinstance(value, ParkedState):
                    state[key] = self.bank.restore(value.name, value.device, non_blocking=non_blocking)
                    self._names.discard(value.name)

    def prefetch(self, params: Iterable[torch.Tensor] | torch.Tensor) -> None:
        """Start copying these params' parked state back to their devices; `unpark` (or the next step) finishes."""
        for p in _as_list(params):
            if p in self._parked:
                for value in self.optimizer.state[p].values():
                    if isinstance(value, ParkedState):
                        self.bank.prefetch(value.name, value.device)

    def drop(self, params: Iterable[torch.Tensor] | torch.Tensor) -> None:
        """Forget these params' state, parked or not (LISA's "reset" policy): their next step starts from zero."""
        for p in _as_list(params):
            self._parked.pop(p, None)
            for value in self.optimizer.state.pop(p, {}).values():
                if isinstance(value, ParkedState):
                    self.bank.discard(value.name)
                    self._names.discard(value.name)

    # ------------------------------------------------------------------------------------ the optimizer's hooks

    def _offload(self, p: torch.Tensor, key: str, value: torch.Tensor) -> ParkedState:
        name = f"{self._prefix}/{id(p):x}/{key}"
        self.bank.offload(name, value)
        self._names.add(name)
        return ParkedState(self.bank, name, p.device)

    def _before_step(self, optimizer, args, kwargs) -> None:
        if self._parked:
            self.unpark([p for p in self._parked if p.grad is not None])

    def _complete_state_dict(self, optimizer, state_dict: dict) -> dict | None:
        if not self._parked:
            return None
        # The inner dicts are the live state: build new ones, never mutate them.
        state = {i: {k: v.read() if isinstance(v, ParkedState) else v for k, v in entry.items()}
                 if any(isinstance(v, ParkedState) for v in entry.values()) else entry
                 for i, entry in state_dict["state"].items()}
        return {**state_dict, "state": state}

    def _before_load(self, optimizer, state_dict: dict) -> dict:
        """Take the tensors to park out of `state_dict` (the rest loads as usual); `_after_load` parks them."""
        state, taken = dict(state_dict["state"]), []
        for saved_id, p in saved_ids_and_params(optimizer, state_dict):
            saved = state.get(saved_id)
            if saved is None or (self.park_on_load == "frozen" and p.requires_grad):
                continue
            tensors = {k: v for k, v in saved.items() if _parkable(v)}
            if tensors:
                state[saved_id] = {k: v for k, v in saved.items() if k not in tensors}
                taken.append((p, tensors))
        # What is parked now is forgotten only once the load has succeeded (a failed load loses nothing).
        self._loading = (set(self._names), taken)
        return {**state_dict, "state": state}

    def _after_load(self, optimizer) -> None:
        old_names, taken = self._loading
        self._loading = None
        for name in old_names:
            self.bank.discard(name)
        self._names.difference_update(old_names)
        self._parked.clear()
        for p, tensors in taken:
            state = optimizer.state[p]
            for key, value in tensors.items():
                if value.is_floating_point() and p.is_floating_point():
                    value = value.to(self.state_dtype(p) if self.state_dtype is not None else p.dtype)
                state[key] = self._offload(p, key, value)
            self._parked[p] = None
