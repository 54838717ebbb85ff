"""Frozen decoder layers' weights in host memory, each brought to the device only while it computes.

A frozen layer still runs its forward, and its backward (the gradient flows through it to the trainable layers
below and to the input embedding), but its weights do not change during the period. So they can live in host
memory (pinned where possible) and come to the device for the layer's forward, and again for the recompute and
backward when the layer is gradient-checkpointed, while the next layer's weights are copied ahead on a side stream.
At Llama-3-8B a decoder layer is 218M parameters (0.44 GB in bf16): 30 frozen layers are 13 GB of the 16 GB of
weights, and the device holds two of them at a time (the computing one and the prefetched one).

The price is the copies: each offloaded layer crosses to the device once in the forward and once in the backward's
recompute, 2 x 0.44 GB per layer and step at 8B, for about 4 x 2 x 218M = 1.7 GFLOP of its compute per token
(forward, recompute, and backward's two products). With few tokens per step the copies take longer than the compute;
the prefetch hides them once a step has enough tokens for the compute to outlast them. So offload only the layers
that do not fit (`LisaConfig.offload_frozen_layers`), with as many tokens per step as memory allows. Results are
bit-identical: the same weights are used, from another place.

How a layer knows it is needed: a forward pre-hook on every leaf module of the layer (a layer's own hooks do not
run again in a checkpoint's recompute, which transformers runs on the layer's inner forward). When layer j starts:

- in the forward pass, every other offloaded layer is released, unless gradients are being recorded through a
  layer that is not checkpointed (it then keeps its weights for its backward, until `release_all`);
- in the backward pass (a checkpointed layer's recompute), every other offloaded layer is released: backward runs
  the layers from the last to the first, and layer j's recompute starts only when the gradient of its output is
  complete, i.e. when the layers above it have finished their backward;
- then layer j is made resident (waiting for its prefetch, if one is in flight) and the next offloaded layer in the
  direction of travel (j+1 forward, j-1 backward) is prefetched.

The trainer calls `release_all()` after each backward (and evaluation) so that nothing offloaded stays between steps.

`model.state_dict()` (and so `save_pretrained`) returns a released weight's host copy, never its empty stand-in.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from torch import nn

from lisa_kernels import HostTensors


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _checkpointed(layer: nn.Module) -> bool:
    """transformers' flag for a layer that recomputes its forward in backward (non-reentrant checkpointing)."""
    return bool(getattr(layer, "gradient_checkpointing", False)) and layer.training


class FrozenWeightOffload:
    """Keeps the weights of chosen frozen decoder layers in host memory (see the module docstring).

    `layers` are the decoder layers in forward order; `set_offloaded(indices)` says which of them live in host
    memory from now on (a layer leaving the set comes back to the device for good; one joining it is copied out
    with the weights it has now). Layers whose parameters require gradients cannot be offloaded.
    """

    def __init__(self, layers: Sequence[nn.Module], *, pin_memory: bool = True):
        self.layers = list(layers)
        self._params = [[p for p in layer.parameters()] for layer in self.layers]
        self._host: dict[nn.Parameter, torch.Tensor] = {}  # a host copy for every parameter ever offloaded
        self._offloaded: set[int] = set()
        self._resident: set[int] = set()  # offloaded layers whose weights are on the device now
        self._prefetch: dict[int, tuple[list[torch.Tensor], object]] = {}  # layer -> (device copies, copy event)
        self._pin = pin_memory
        self._pinned: HostTensors | None = None
        self._stream = None
        self._entered: tuple[int, bool] | None = None  # the (layer, in backward) the hooks last acted for
        self._hooks = []
        for index, layer in enumerate(self.layers):
            for module in layer.modules():
                if any(True for _ in module.parameters(recurse=False)):
                    self._hooks.append(module.register_forward_pre_hook(
                        lambda _module, _args, index=index: self._enter(index)))
            self._hooks.append(layer._register_state_dict_hook(self._host_copies_in_state_dict(index)))

    # ------------------------------------------------------------------------------------------------ public API

    @property
    def offloaded(self) -> tuple[int, ...]:
        return tuple(sorted(self._offloaded))

    def host_copies(self, index: int) -> list[torch.Tensor]:
        """The host copies of offloaded layer `index`'s parameters."""
        return [self._host[p] for p in self._params[index]]

    def staged_bytes(self) -> int:
        """Bytes of offloaded layers' weights on the device right now (computing, or kept for their backward)."""
        return sum(t.nbytes for i in self._resident for t in self.host_copies(i))

    def offloaded_bytes(self) -> int:
        """Bytes of weights kept off the device (the offloaded layers that are not resident right now)."""
        return sum(t.nbytes for i in self._offloaded - self._resident for t in self.host_copies(i))

    def set_offloaded(self, indices: Iterable[int]) -> None:
        indices = set(indices)
        unknown = [i for i in indices if not 0 <= i < len(self.layers)]
        if unknown:
            raise ValueError(f"FrozenWeightOffload: no decoder layer {unknown} (the model has {len(self.layers)})")
        trained = [i for i in indices if any(p.requires_grad for p in self._params[i])]
        if trained:
            raise ValueError(f"FrozenWeightOffload: decoder layers {trained} are trainable; only frozen layers' "
                             f"weights can live in host memory")
        for index in self._offloaded - indices:  # back for good
            if index not in self._resident:
                self._materialize(index)
            self._resident.discard(index)
            self._offloaded.discard(index)
        for index in indices - self._offloaded:
            for p in self._params[index]:
                self._host_buffer(p).copy_(p.detach())
            self._offloaded.add(index)
            self._resident.add(index)
            self._release(index)

    def release_all(self) -> None:
        """Send every offloaded layer's weights back to host memory (after a backward or an evaluation)."""
        for index in list(self._resident):
            self._release(index)
        for index in list(self._prefetch):
            self._drop_prefetch(index)

    def close(self) -> None:
        """Bring every offloaded layer back to the device, remove the hooks and free the host copies: the layers are
        as they were before the offload."""
        self.set_offloaded(())
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()
        self._host.clear()
        self._pinned = None

    # ---------------------------------------------------------------------------------------------- the hooks

    def _enter(self, index: int) -> None:
        if index not in self._offloaded:
            return
        backward = _in_backward()
        if self._entered == (index, backward):  # the layer's other leaf modules: all done at its first
            return
        self._entered = (index, backward)
        if index not in self._resident:
            keep_for_backward = torch.is_grad_enabled() and not backward
            for other in list(self._resident):
                if not (keep_for_backward and not _checkpointed(self.layers[other])):
                    self._release(other)
            self._materialize(index)
            self._resident.add(index)
        # The forward's last offloaded layer is still resident when its recompute starts the backward: the layer
        # below it is fetched from then on.
        step = -1 if backward else 1
        ahead = next((i for i in range(index + step, -1 if step < 0 else len(self.layers), step)
                      if i in self._offloaded), None)
        if ahead is not None and ahead not in self._resident and ahead not in self._prefetch:
            self._start_prefetch(ahead)

    def _host_copies_in_state_dict(self, index: int):
        names = {id(p): name for name, p in self.layers[index].named_parameters()}

        def hook(_module, state_dict, prefix, _metadata):
            if index in self._offloaded and index not in self._resident:
                for p in self._params[index]:
                    state_dict[prefix + names[id(p)]] = self._host[p]
            return state_dict

        return hook

    # ------------------------------------------------------------------------------------------ moving weights

    def _host_buffer(self, p: nn.Parameter) -> torch.Tensor:
        if p not in self._host:
            if p.device.type == "cuda":  # pinned, from an arena that packs them (see HostTensors)
                if self._pinned is None:
                    self._pinned = HostTensors(pin=self._pin)
                self._host[p] = self._pinned.empty(p.shape, p.dtype)
            else:  # meta: accounting without data; CPU: nothing to pin
                self._host[p] = torch.empty(p.shape, dtype=p.dtype, device="meta" if p.device.type == "meta" else "cpu")
        return self._host[p]

    def _release(self, index: int) -> None:
        for p in self._params[index]:
            p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        self._resident.discard(index)
        if self._entered is not None and self._entered[0] == index:
            self._entered = None

    def _device_copies(self, index: int) -> list[torch.Tensor]:
        return [torch.empty(self._host[p].shape, dtype=p.dtype, device=p.device) for p in self._params[index]]

    def _materialize(self, index: int) -> None:
        """A released layer's weights back on the device."""
        if index in self._prefetch:
            copies, event = self._prefetch.pop(index)
            torch.cuda.current_stream().wait_event(event)
        else:
            copies = self._device_copies(index)
            for copy, p in zip(copies, self._params[index]):
                copy.copy_(self._host[p], non_blocking=True)
        for p, copy in zip(self._params[index], copies):
            p.data = copy

    def _start_prefetch(self, index: int) -> None:
        params = self._params[index]
        if not params or params[0].device.type != "cuda":
            return  # elsewhere a copy is synchronous: nothing to overlap
        if self._stream is None:
            self._stream = torch.cuda.Stream(device=params[0].device)
        copies = self._device_copies(index)  # allocated on the compute stream, which frees them
        self._stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self._stream):
            for copy, p in zip(copies, params):
                copy.copy_(self._host[p], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
        self._prefetch[index] = (copies, event)

    def _drop_prefetch(self, index: int) -> None:
        _, event = self._prefetch.pop(index)
        torch.cuda.current_stream().wait_event(event)  # the side stream must be done writing before the memory is reused
