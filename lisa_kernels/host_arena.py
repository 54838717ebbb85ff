"""The host arena behind HostStateBank: large chunks of (pinned) host memory, sub-allocated best-fit.

Pinning costs ~ms per `cudaHostAlloc`, so chunks are allocated rarely and reused: hundreds of park/unpark cycles do
not grow the arena. Chunks come from the native extension (`csrc/host_arena.cpp`: exactly the size asked for) or
from plain PyTorch (`torch.empty(pin_memory=True)`, which PyTorch's caching host allocator rounds up to a power of
two, so that path asks for powers of two and wastes nothing).
"""
from __future__ import annotations

import bisect
import dataclasses
import warnings

import torch

from lisa_kernels import _native
from lisa_kernels._native import PAGE_SIZE

# Slot starts are 256-byte aligned: any dtype can view the bytes, and DMA engines read aligned lines faster.
ALIGN = 256


def round_up(n: int, to: int) -> int:
    return (n + to - 1) // to * to


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


# ---------------------------------------------------------------------------------------------------- chunks


class ChunkSource:
    """Where the arena's chunks come from: the native extension or plain PyTorch, pinned or not."""

    def __init__(self, ops, pinned: bool):
        self.ops = ops          # torch.ops.lisa_kernels, or None for the fallback
        self.pinned = pinned

    @property
    def name(self) -> str:
        return "native" if self.ops is not None else "fallback"

    def size_for(self, nbytes: int) -> int:
        """The bytes a request of `nbytes` really takes, so the arena can count (and cap) what it holds."""
        if self.ops is None and self.pinned:
            # PyTorch's caching host allocator rounds pinned requests up to a power of two; ask for that directly.
            return max(_next_pow2(nbytes), PAGE_SIZE)
        return round_up(max(nbytes, 1), PAGE_SIZE)

    def alloc(self, nbytes: int) -> torch.Tensor:
        """A 1-D uint8 CPU tensor of `nbytes`; raises RuntimeError when the memory (or the pinning) is refused."""
        if self.ops is not None:
            return self.ops.host_alloc(nbytes, self.pinned)
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pinned)


class _Chunk:
    __slots__ = ("data", "free")

    def __init__(self, data: torch.Tensor):
        self.data = data
        self.free: list[tuple[int, int]] = [(0, data.numel())]  # (offset, size), sorted by offset, never adjacent


@dataclasses.dataclass(eq=False)
class Slot:
    chunk: _Chunk
    offset: int
    size: int  # bytes reserved (aligned), >= the bytes used


class ArenaFull(Exception):
    """The arena cannot hold a request: `reason` says why (cap reached, pinning refused)."""


class Arena:
    """Chunks of host memory sub-allocated best-fit, with freed ranges merged back into their neighbours."""

    def __init__(self, source: ChunkSource, chunk_bytes: int, max_bytes: int | None):
        self.source = source
        self.chunk_bytes = chunk_bytes
        self.max_bytes = max_bytes
        self.chunks: list[_Chunk] = []
        self.reserved = 0                 # bytes of all chunks
        self.refused: str | None = None   # set once pinning has been refused; later requests fail fast

    def alloc(self, nbytes: int) -> Slot:
        size = round_up(max(nbytes, 1), ALIGN)
        slot = self._best_fit(size)
        if slot is None:
            self.grow(size)
            slot = self._best_fit(size)
        return slot

    def free(self, slot: Slot) -> None:
        free = slot.chunk.free
        off, size = slot.offset, slot.size
        i = bisect.bisect_left(free, (off, 0))
        if i < len(free) and off + size == free[i][0]:        # merge with the range after
            size += free.pop(i)[1]
        if i > 0 and free[i - 1][0] + free[i - 1][1] == off:  # merge with the range before
            off, size = free[i - 1][0], free[i - 1][1] + size
            free[i - 1] = (off, size)
        else:
            free.insert(i, (off, size))

    def _best_fit(self, size: int) -> Slot | None:
        best = None  # (range size, chunk, index in its free list)
        for chunk in self.chunks:
            for i, (_, free_size) in enumerate(chunk.free):
                if free_size >= size and (best is None or free_size < best[0]):
                    best = (free_size, chunk, i)
        if best is None:
            return None
        free_size, chunk, i = best
        off = chunk.free[i][0]
        if free_size == size:
            chunk.free.pop(i)
        else:
            chunk.free[i] = (off + size, free_size - size)
        return Slot(chunk, off, size)

    def grow(self, size: int) -> None:
        """Add a chunk that can hold `size` bytes, or raise ArenaFull saying why not."""
        if self.refused is not None:
            raise ArenaFull(self.refused)
        room = None if self.max_bytes is None else self.max_bytes - self.reserved
        wants = [max(size, self.chunk_bytes), size]  # a large chunk; failing that, just this request
        tried = []
        for want in dict.fromkeys(self.source.size_for(w) for w in wants):
            if room is not None and want > room:
                continue
            try:
                data = self.source.alloc(want)
            except RuntimeError as e:
                tried.append(str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__)
                continue
            self.chunks.append(_Chunk(data))
            self.reserved += want
            return
        if tried:
            self.refused = f"pinning refused ({tried[-1]})" if self.source.pinned else f"allocation refused ({tried[-1]})"
            raise ArenaFull(self.refused)
        raise ArenaFull(f"max_pinned_bytes={self.max_bytes} reached ({self.reserved} bytes in the arena)")

    def trim(self) -> int:
        """Give wholly free chunks back to the OS; returns the bytes released."""
        keep, released = [], 0
        for chunk in self.chunks:
            if chunk.free == [(0, chunk.data.numel())]:
                released += chunk.data.numel()
            else:
                keep.append(chunk)
        self.chunks = keep
        self.reserved -= released
        return released


def slot_view(slot: Slot, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """The first bytes of `slot` as a tensor of `shape` and `dtype`."""
    nbytes = shape.numel() * dtype.itemsize
    return slot.chunk.data[slot.offset:slot.offset + nbytes].view(dtype).view(shape)


class HostTensors:
    """Host tensors carved from an arena's chunks, for data that stays in host memory and is copied to the device
    again and again (frozen layers' weights). Pinned chunks come from the native extension at the size asked for,
    or from PyTorch, whose caching host allocator rounds each request up to a power of two: tensors share chunks
    here, where one pinned tensor per weight would round a Llama-3-8B MLP matrix of 117 MB up to 134 MB (+11% of
    host memory for the 30 frozen layers). The tensors live as long as this object. Where the arena cannot grow
    (pinning refused), a tensor gets pageable memory, after one warning: copies from it are slower, not wrong."""

    def __init__(self, pin: bool, chunk_bytes: int = 64 << 20):
        self._arena = Arena(ChunkSource(_native.load(), pin), chunk_bytes, None)
        self._warned = False

    def empty(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        shape = torch.Size(shape)
        if shape.numel() == 0:
            return torch.empty(shape, dtype=dtype)
        try:
            return slot_view(self._arena.alloc(shape.numel() * dtype.itemsize), shape, dtype)
        except ArenaFull as e:
            if not self._warned:
                warnings.warn(f"HostTensors: host memory arena cannot grow ({e}); using pageable memory",
                              RuntimeWarning, stacklevel=2)
                self._warned = True
            return torch.empty(shape, dtype=dtype)
