"""HostStateBank: named tensors parked in host memory, moved to and from the device on a copy stream.

Ordering, in one place: `offload` copies on the copy stream after waiting for the current stream (the tensor's
producers), and `record_stream` keeps the caller's freed tensor from being reused before the copy has read it;
`restore` makes the current stream wait on the copy's event. An entry's host memory is recycled only once every
copy that reads or writes it has finished (`_pending`).

Host memory comes from one arena (`host_arena.py`). When it cannot grow (the `max_pinned_bytes` cap, or pinning
refused), tensors go to pageable memory with ONE warning: slower copies, no state lost. Without CUDA, "device"
tensors are CPU tensors, every copy is synchronous and the arena is plain memory standing in for pinned memory,
so the cap, the fallback and the bookkeeping run (and are tested) exactly as on a GPU machine.

Not thread-safe: use one bank from one thread (the training loop).
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Iterator, NamedTuple

import torch

from lisa_kernels import _native
from lisa_kernels.host_arena import ALIGN, Arena, ArenaFull, ChunkSource, Slot, round_up, slot_view

__all__ = ["HostStateBank"]

_DEFAULT = object()  # "use the bank's storage_dtype" for offload(..., storage_dtype=...)




def _is_byte_count(value, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum



class _Copy(NamedTuple):
    """A host-to-device copy in flight: its destination and the event that marks it done (None: synchronous)."""
    tensor: torch.Tensor
    done: torch.cuda.Event | None


@dataclasses.dataclass(eq=False)
class _Parked:
    shape: torch.Size
    dtype: torch.dtype               # the tensor's own dtype: restore gives this back
    device: torch.device             # where it came from: restore's default destination
    host: torch.Tensor               # the stored bytes, viewed as (shape, storage dtype), contiguous
    slot: Slot | None               # its arena range; None when pageable (or zero-size)
    ready: torch.cuda.Event | None = None  # the device-to-host copy has finished
    prefetched: _Copy | None = None        # an early restore

    @property
    def nbytes(self) -> int:
        return self.host.numel() * self.host.element_size()


class HostStateBank:
    """Named tensors parked in host memory, moved to and from the device asynchronously.

    Args:
        max_pinned_bytes: cap on the arena (pinned memory). Beyond it tensors go to pageable memory, with one
            warning. None: no cap (pinning refused by the system still falls back the same way).
        storage_dtype: e.g. torch.bfloat16 to halve host RAM for fp32 moments while parked (rounded to nearest
            even; restore casts back). Applies to floating tensors wider than it; others are stored as they are.
        chunk_bytes: arena growth step. Each growth is one allocation (~ms when pinned); a request larger than this
            gets a chunk of its own size. `reserve(nbytes)` sizes the arena exactly in one go.
        backend: "auto" (native extension when it builds, else fallback), "native" (raise if unavailable) or
            "fallback" (pure PyTorch).
        pin: page-lock the arena; default: when CUDA is available.
    """

    def __init__(self, *, max_pinned_bytes: int | None = None, storage_dtype: torch.dtype | None = None,
                 chunk_bytes: int = 64 << 20, backend: str = "auto", pin: bool | None = None):
        if max_pinned_bytes is not None and not _is_byte_count(max_pinned_bytes, minimum=0):
            raise ValueError(f"HostStateBank: max_pinned_bytes must be a number of bytes (an int >= 0, e.g. 1 << 30 "
                             f"for 1 GiB) or None, got {max_pinned_bytes!r}")
        if not _is_byte_count(chunk_bytes, minimum=1):
            raise ValueError(f"HostStateBank: chunk_bytes must be a number of bytes (an int > 0), got {chunk_bytes!r}")
        if storage_dtype is not None and not (isinstance(storage_dtype, torch.dtype)
                                              and storage_dtype.is_floating_point):
            raise ValueError(f"HostStateBank: storage_dtype must be None or a floating torch.dtype, got "
                             f"{storage_dtype!r}")
        if not isinstance(backend, str) or backend not in ("auto", "native", "fallback"):
            raise ValueError(f"HostStateBank: backend must be 'auto', 'native' or 'fallback', got {backend!r}")
        if pin is not None and not isinstance(pin, bool):
            raise ValueError(f"HostStateBank: pin must be True, False or None (pin when CUDA is available), got "
                             f"{pin!r}")
        if pin is None:
            pin = torch.cuda.is_available()
        if pin and not torch.cuda.is_available():
            raise ValueError("HostStateBank: pin=True needs CUDA, and torch.cuda.is_available() is False")
        ops = None
        if backend != "fallback":
            ops = _native.load()
            if ops is None and backend == "native":
                raise RuntimeError(f"native host arena unavailable: {_native.failure_reason()}")
        self.storage_dtype = storage_dtype
        self._arena = Arena(ChunkSource(ops, pin), chunk_bytes, max_pinned_bytes)
        self._entries: dict[str, _Parked] = {}
        self._pending: list[tuple[list, object]] = []  # (events, slot or tensor): freed once all events are done
        self._copy_streams: dict[torch.device, torch.cuda.Stream] = {}
        self._warned = False

    # ----------------------------------------------------------------------------------------- reporting

    @property
    def backend(self) -> str:
        """'native' or 'fallback'."""
        return self._arena.source.name

    @property
    def pinned(self) -> bool:
        """Whether the arena is page-locked memory (False without CUDA: plain memory stands in for it)."""
        return self._arena.source.pinned

    @property
    def max_pinned_bytes(self) -> int | None:
        return self._arena.max_bytes

    @property
    def bytes_held(self) -> int:
        """Bytes of parked data (as stored: halved by a bf16 storage_dtype), pinned plus pageable."""
        return sum(e.nbytes for e in self._entries.values())

    @property
    def pinned_bytes(self) -> int:
        """Bytes of parked data held in the arena."""
        return sum(e.nbytes for e in self._entries.values() if e.slot is not None)

    @property
    def pageable_bytes(self) -> int:
        """Bytes of parked data in pageable memory (the arena was full or pinning was refused)."""
        return sum(e.nbytes for e in self._entries.values() if e.slot is None)

    @property
    def arena_bytes(self) -> int:
        """Bytes the arena has taken from the system (held or free for reuse)."""
        return self._arena.reserved

    def stats(self) -> dict:
        return {"backend": self.backend, "pinned": self.pinned, "tensors": len(self._entries),
                "bytes_held": self.bytes_held, "pinned_bytes": self.pinned_bytes,
                "pageable_bytes": self.pageable_bytes, "arena_bytes": self.arena_bytes}

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def __iter__(self) -> Iterator[str]:
        return iter(list(self._entries))

    def __repr__(self) -> str:
        return (f"HostStateBank(backend={self.backend!r}, pinned={self.pinned}, tensors={len(self)}, "
                f"bytes_held={self.bytes_held}, arena_bytes={self.arena_bytes})")

    # --------------------------------------------------------------------------------------------- moves

    def reserve(self, size) -> None:
        """Grow the arena once so that `size` more bytes fit, e.g. every frozen layer's state, known up front.
        `size` is a byte count or the tensors to be parked (then their storage dtype and alignment are counted)."""
        if isinstance(size, int):
            nbytes = size
        else:
            nbytes = sum(round_up(t.numel() * self._stored_dtype(t.dtype, _DEFAULT).itemsize, ALIGN)
                         for t in size)
        free = sum(free_size for chunk in self._arena.chunks for _, free_size in chunk.free)
        if nbytes > free:
            try:
                self._arena.grow(round_up(nbytes - free, ALIGN))
            except ArenaFull as e:
                self._warn_pageable(str(e), nbytes - free, stacklevel=3)

    def offload(self, name: str, tensor: torch.Tensor, *, storage_dtype=_DEFAULT) -> None:
        """Park `tensor` under `name` (replacing what was there). Drop your reference afterwards and do not write to
        `tensor` again: on a GPU the copy is still running; its memory is reusable as soon as the copy has read it.

        `storage_dtype` overrides the bank's for this tensor (None: store exactly)."""
        tensor = tensor.detach()
        if name in self._entries:
            self.discard(name)
        stored = self._stored_dtype(tensor.dtype, storage_dtype)
        host, slot = self._host_buffer(tensor.shape, stored)
        entry = _Parked(tensor.shape, tensor.dtype, tensor.device, host, slot)
        if tensor.numel() > 0:
            if tensor.is_cuda:
                stream = self._copy_stream(tensor.device)
                stream.wait_stream(torch.cuda.current_stream(tensor.device))  # the tensor's producers first
                with torch.cuda.stream(stream):
                    src = tensor if stored == tensor.dtype else tensor.to(stored)
                    host.copy_(src, non_blocking=True)  # truly async only into pinned memory
                    entry.ready = torch.cuda.Event()
                    entry.ready.record(stream)
                # The caller frees `tensor` now; the allocator must not hand its block out before the copy read it.
                tensor.record_stream(stream)
            else:
                host.copy_(tensor)
        self._entries[name] = entry

    def prefetch(self, name: str, device: torch.device | str | None = None) -> None:
        """Start bringing `name` back to `device` (default: where it came from) without waiting for it."""
        entry = self._entries[name]
        device = self._device(device, entry)
        if device.type != "cuda" or entry.host.numel() == 0:
            return  # a synchronous copy gains nothing from starting early
        if entry.prefetched is not None:
            if entry.prefetched.tensor.device == device:
                return
            entry.prefetched.done.synchronize()  # rare: prefetched to another device; let that copy finish reading
            entry.prefetched = None
        entry.prefetched = self._to_device(entry, device)

    def restore(self, name: str, device: torch.device | str | None = None, non_blocking: bool = True
                ) -> torch.Tensor:
        """Take `name` out of the bank as a tensor on `device` (default: where it came from), in its own dtype.

        On a GPU the copy runs on the copy stream and the current stream waits for it, so the result is ready for
        anything queued on the current stream; `non_blocking=False` also waits on the host."""
        entry = self._entries.pop(name)
        device = self._device(device, entry)
        stale = None  # a prefetch to another device: still reading the host memory
        if entry.prefetched is not None and entry.prefetched.tensor.device == device:
            out, done = entry.prefetched
        else:
            if entry.prefetched is not None:
                stale = entry.prefetched.done
            out, done = self._to_device(entry, device)
        entry.prefetched = None
        if done is not None:
            current = torch.cuda.current_stream(device)
            current.wait_event(done)
            if out.numel() > 0:
                out.record_stream(current)  # allocated on the copy stream, used (and freed) on this one
            if not non_blocking:
                done.synchronize()
        self._release(entry, done, stale)
        return out

    def meta(self, name: str) -> tuple[torch.Size, torch.dtype]:
        """The shape and dtype `read` gives for `name`, without reading it."""
        entry = self._entries[name]
        return entry.shape, entry.dtype

    def read(self, name: str) -> torch.Tensor:
        """A CPU copy of `name` in its own dtype, leaving it parked (for checkpoints)."""
        entry = self._entries[name]
        if entry.ready is not None:
            entry.ready.synchronize()
        if entry.host.dtype == entry.dtype:
            return entry.host.clone()
        return entry.host.to(entry.dtype)

    def discard(self, name: str) -> None:
        """Forget `name` (a no-op when absent); its host memory is reused once no copy needs it."""
        entry = self._entries.pop(name, None)
        if entry is None:
            return
        done = entry.prefetched.done if entry.prefetched is not None else None
        entry.prefetched = None
        self._release(entry, done)

    def clear(self) -> None:
        for name in list(self._entries):
            self.discard(name)

    def synchronize(self) -> None:
        """Wait for every copy the bank started, and recycle the memory they held."""
        for entry in self._entries.values():
            if entry.ready is not None:
                entry.ready.synchronize()
            if entry.prefetched is not None and entry.prefetched.done is not None:
                entry.prefetched.done.synchronize()
        self._wait_pending()

    def trim(self) -> int:
        """Give wholly free arena chunks back to the system; returns the bytes released."""
        self.synchronize()
        return self._arena.trim()

    # ------------------------------------------------------------------------------------------- helpers

    def _stored_dtype(self, dtype: torch.dtype, override) -> torch.dtype:
        target = self.storage_dtype if override is _DEFAULT else override
        if target is None or not dtype.is_floating_point or target.itemsize >= dtype.itemsize:
            return dtype
        return target

    def _device(self, device, entry: _Parked) -> torch.device:
        device = entry.device if device is None else torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        return device

    def _copy_stream(self, device: torch.device) -> torch.cuda.Stream:
        stream = self._copy_streams.get(device)
        if stream is None:
            stream = self._copy_streams[device] = torch.cuda.Stream(device=device)
        return stream

    def _host_buffer(self, shape: torch.Size, dtype: torch.dtype) -> tuple[torch.Tensor, Slot | None]:
        """Host memory for one tensor: an arena range, or pageable memory when the arena cannot grow."""
        nbytes = shape.numel() * dtype.itemsize
        if nbytes == 0:
            return torch.empty(shape, dtype=dtype), None
        self._reap()
        try:
            slot = self._alloc_slot(nbytes)
        except ArenaFull as e:
            self._warn_pageable(str(e), nbytes)
            return torch.empty(shape, dtype=dtype, pin_memory=False), None
        return slot_view(slot, shape, dtype), slot

    def _alloc_slot(self, nbytes: int) -> Slot:
        try:
            return self._arena.alloc(nbytes)
        except ArenaFull:
            if not self._pending:
                raise
        # Ranges still read by in-flight copies may fit: wait for those copies rather than grow the arena.
        self._wait_pending()
        return self._arena.alloc(nbytes)

    def _warn_pageable(self, reason: str, nbytes: int, stacklevel: int = 4) -> None:
        if self._warned:
            return
        self._warned = True
        warnings.warn(f"HostStateBank: {reason}; parking {nbytes} bytes and anything else that does not fit in "
                      f"pageable host memory (slower copies, no state lost). This warning is shown once per bank.",
                      RuntimeWarning, stacklevel=stacklevel)

    def _to_device(self, entry: _Parked, device: torch.device) -> _Copy:
        """Start copying `entry` to `device`."""
        host = entry.host
        if device.type != "cuda":
            if entry.ready is not None:
                entry.ready.synchronize()  # a synchronous read of data still arriving from a GPU
            out = torch.empty(entry.shape, dtype=entry.dtype, device=device)
            out.copy_(host)  # converts a narrower storage dtype back
            return _Copy(out, None)
        stream = self._copy_stream(device)
        if entry.ready is not None:
            stream.wait_event(entry.ready)  # parked from another device, or still on its way in
        with torch.cuda.stream(stream):
            # Allocated on the copy stream; restore() hands it to the current stream with record_stream.
            staged = torch.empty(entry.shape, dtype=host.dtype, device=device)
            staged.copy_(host, non_blocking=True)
            out = staged if host.dtype == entry.dtype else staged.to(entry.dtype)
            done = torch.cuda.Event()
            done.record(stream)
        return _Copy(out, done)

    def _release(self, entry: _Parked, *copies) -> None:
        """Free `entry`'s host memory once every copy that reads or writes it (`copies`, entry.ready: CUDA events,
        None for synchronous ones) is done."""
        events = [e for e in (entry.ready, *copies) if e is not None]
        if events:
            self._pending.append((events, entry.slot if entry.slot is not None else entry.host))
            self._reap()
        elif entry.slot is not None:
            self._arena.free(entry.slot)

    def _reap(self) -> None:
        still = []
        for events, held in self._pending:
            if all(e.query() for e in events):
                if isinstance(held, Slot):
                    self._arena.free(held)
            else:
                still.append((events, held))
        self._pending = still

    def _wait_pending(self) -> None:
        for events, _ in self._pending:
            for e in events:
                e.synchronize()
        self._reap()
