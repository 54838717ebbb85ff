"""HostStateBank: round trips, storage dtypes, the pinned arena, HostTensors (parking: test_bank_parking.py).

Every bank test runs on both backends: the native extension (skipped only when it genuinely cannot be built here,
with the reason) and the pure-PyTorch fallback. Without a GPU the "device" is the CPU and every copy is
synchronous; the `cuda`-marked tests check the asynchronous path, device memory and stream ordering.
"""
import random
import warnings

import pytest
import torch
from bank_checks import assert_bitwise_equal, cuda, make_bank, sample

from lisa_kernels import _native
from lisa_kernels.host_arena import ALIGN, Arena, ArenaFull, ChunkSource
from lisa_kernels.host_state_bank import HostStateBank

# ------------------------------------------------------------------------------------------ round trips

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8,
          torch.bool]
SHAPES = [(5, 123), (1,), (), (0,), (3, 0, 7), (2, 3, 5, 7)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_round_trip_exact(backend, dtype):
    bank = make_bank(backend)
    tensors = {f"t{i}": sample(shape, dtype, seed=i) for i, shape in enumerate(SHAPES)}
    for name, t in tensors.items():
        bank.offload(name, t.clone())
    assert bank.bytes_held == sum(t.numel() * t.element_size() for t in tensors.values())
    for name, t in tensors.items():
        assert_bitwise_equal(bank.restore(name), t)
    assert len(bank) == 0 and bank.bytes_held == 0


def test_many_tensors_any_order(backend):
    bank = make_bank(backend, chunk_bytes=64 << 10)
    rng = random.Random(0)
    dtypes = [torch.float32, torch.bfloat16, torch.int64, torch.float16]
    tensors = {f"p{i}": sample((rng.randint(0, 3000),), rng.choice(dtypes), seed=i) for i in range(300)}
    for name, t in tensors.items():
        bank.offload(name, t)
    assert len(bank) == 300 and all(name in bank for name in tensors)
    assert bank.pinned_bytes == bank.bytes_held and bank.pageable_bytes == 0
    order = list(tensors)
    rng.shuffle(order)
    for name in order:
        assert_bitwise_equal(bank.restore(name), tensors[name])
    assert bank.bytes_held == 0


def test_non_contiguous_comes_back_contiguous(backend):
    bank = make_bank(backend)
    t = sample((64, 48), torch.float32)
    bank.offload("t", t.t())
    out = bank.restore("t")
    assert out.is_contiguous()
    assert_bitwise_equal(out, t.t().contiguous())


def test_read_discard_replace(backend):
    bank = make_bank(backend)
    a, b = sample((100,), torch.float32, seed=1), sample((7, 3), torch.int32, seed=2)
    bank.offload("x", a)
    copy_ = bank.read("x")
    assert copy_.device.type == "cpu"
    assert_bitwise_equal(copy_, a.cpu())
    assert "x" in bank  # read leaves it parked
    bank.offload("x", b)  # same name: replaces
    assert len(bank) == 1 and bank.bytes_held == b.numel() * 4
    assert_bitwise_equal(bank.restore("x"), b)
    bank.offload("y", a)
    bank.discard("y")
    bank.discard("never-there")
    assert "y" not in bank and bank.bytes_held == 0
    with pytest.raises(KeyError):
        bank.restore("y")


# ------------------------------------------------------------------------------------------ storage dtype


def test_bf16_storage_halves_bytes_and_rounds_to_nearest(backend):
    bank = make_bank(backend, storage_dtype=torch.bfloat16)
    moments = sample((257, 31), torch.float32, seed=3)
    half = sample((9,), torch.float16, seed=4)
    ints = sample((11,), torch.int64, seed=5)
    step = torch.tensor(12345.0)
    bank.offload("m", moments)
    bank.offload("h", half)
    bank.offload("i", ints)
    bank.offload("step", step, storage_dtype=None)  # exact, whatever the bank's default
    assert bank.bytes_held == moments.numel() * 2 + half.numel() * 2 + ints.numel() * 8 + 4
    assert_bitwise_equal(bank.read("m"), moments.to(torch.bfloat16).to(torch.float32).cpu())
    assert_bitwise_equal(bank.restore("m"), moments.to(torch.bfloat16).to(torch.float32))
    assert_bitwise_equal(bank.restore("h"), half)  # not wider than bf16: stored as it is
    assert_bitwise_equal(bank.restore("i"), ints)
    assert bank.restore("step").item() == 12345.0


@pytest.mark.parametrize("argument, value", [
    ("max_pinned_bytes", "1GB"), ("max_pinned_bytes", -1), ("max_pinned_bytes", 1.5e9), ("max_pinned_bytes", True),
    ("chunk_bytes", 0), ("chunk_bytes", "64MB"), ("storage_dtype", torch.int8), ("storage_dtype", "bf16"),
    ("backend", "bogus"), ("backend", None), ("pin", "yes"),
])
def test_invalid_arguments_are_named(argument, value):
    with pytest.raises(ValueError, match=f"HostStateBank: {argument} must be"):
        HostStateBank(**{"backend": "fallback", argument: value})


# ------------------------------------------------------------------------------- arena: cap, refusal, growth


def test_cap_reached_goes_pageable_with_one_warning(backend):
    cap = 256 << 10
    bank = make_bank(backend, max_pinned_bytes=cap, chunk_bytes=64 << 10)
    tensors = {f"t{i}": sample((10_000,), torch.float32, seed=i) for i in range(20)}  # 800 KB in all
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, t in tensors.items():
            bank.offload(name, t)
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1 and "max_pinned_bytes" in messages[0], messages
    assert bank.arena_bytes <= cap
    assert 0 < bank.pinned_bytes <= cap and bank.pageable_bytes > 0
    assert bank.pinned_bytes + bank.pageable_bytes == bank.bytes_held == 20 * 40_000
    for name, t in tensors.items():
        assert_bitwise_equal(bank.restore(name), t)


def test_pinning_refused_goes_pageable_with_one_warning(backend, monkeypatch):
    bank = make_bank(backend)
    calls = []

    def refuse(nbytes):
        calls.append(nbytes)
        raise RuntimeError("cudaHostAlloc failed: out of memory (simulated)")

    monkeypatch.setattr(bank._arena.source, "alloc", refuse)
    tensors = [sample((1000 + i,), torch.float32, seed=i) for i in range(10)]
    with pytest.warns(RuntimeWarning, match="simulated") as record:
        for i, t in enumerate(tensors):
            bank.offload(f"t{i}", t)
    assert len(record) == 1
    assert len(calls) == 2  # one large chunk, then one the size of the request; later requests do not retry
    assert bank.pageable_bytes == bank.bytes_held and bank.arena_bytes == 0
    for i, t in enumerate(tensors):
        assert_bitwise_equal(bank.restore(f"t{i}"), t)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs cudaHostAlloc to fail for want of a GPU")
def test_real_pinning_refusal_without_a_gpu():
    """The native path asks the real CUDA runtime to pin, which fails without a GPU: pageable, one warning."""
    if _native.load() is None:
        pytest.skip(f"native extension cannot be built here: {_native.failure_reason()}")
    bank = make_bank("native")
    bank._arena.source.pinned = True  # what a GPU machine would ask for
    tensors = [sample((100 + i,), torch.float32, seed=i) for i in range(5)]
    with pytest.warns(RuntimeWarning, match="pinning refused") as record:
        for i, t in enumerate(tensors):
            bank.offload(str(i), t)
    assert len(record) == 1 and bank.pageable_bytes == bank.bytes_held > 0
    for i, t in enumerate(tensors):
        assert_bitwise_equal(bank.restore(str(i)), t)


def test_hundreds_of_cycles_do_not_grow_the_arena(backend):
    bank = make_bank(backend, chunk_bytes=256 << 10)
    rng = random.Random(1)
    tensors = {f"l{i}.{k}": sample((rng.randint(1, 6000),), torch.float32, seed=i * 3 + j)
               for i in range(8) for j, k in enumerate(("exp_avg", "exp_avg_sq"))}
    names = list(tensors)
    sizes = []
    for cycle in range(300):
        rng.shuffle(names)
        for name in names[: rng.randint(1, len(names))]:  # a different subset, in a different order, each time
            bank.offload(name, tensors[name])
        for name in list(bank):
            assert_bitwise_equal(bank.restore(name), tensors[name])
        sizes.append(bank.arena_bytes)
    assert len(set(sizes[1:])) == 1 and sizes[-1] == 256 << 10, sorted(set(sizes))
    # Every range went back and merged with its neighbours: each chunk is one free range again.
    assert all(chunk.free == [(0, chunk.data.numel())] for chunk in bank._arena.chunks)
    assert bank.trim() == 256 << 10 and bank.arena_bytes == 0


class _FakeSource(ChunkSource):
    def __init__(self):
        super().__init__(None, False)


def test_arena_best_fit_and_coalescing():
    arena = Arena(_FakeSource(), chunk_bytes=16 * ALIGN, max_bytes=None)
    a, b, c, d = (arena.alloc(n) for n in (ALIGN, 2 * ALIGN, 1, 3 * ALIGN))
    assert [s.offset for s in (a, b, c, d)] == [0, ALIGN, 3 * ALIGN, 4 * ALIGN]
    chunk = a.chunk
    arena.free(b)
    arena.free(d)
    assert chunk.free == [(ALIGN, 2 * ALIGN), (4 * ALIGN, 12 * ALIGN)]
    e = arena.alloc(2 * ALIGN)  # best fit: the hole b left, not the big tail
    assert e.offset == ALIGN
    arena.free(a)
    arena.free(c)
    assert chunk.free == [(0, ALIGN), (3 * ALIGN, 13 * ALIGN)]
    arena.free(e)
    assert chunk.free == [(0, 16 * ALIGN)] and len(arena.chunks) == 1
    big = arena.alloc(40 * ALIGN)  # larger than a chunk: a chunk of its own
    assert len(arena.chunks) == 2 and big.chunk.data.numel() >= 40 * ALIGN


def test_arena_cap_counts_what_the_source_really_takes():
    arena = Arena(ChunkSource(None, True), chunk_bytes=3000, max_bytes=6000)  # fallback pinned: powers of two
    assert arena.source.size_for(3000) == 4096 and arena.source.size_for(5000) == 8192
    arena.source.alloc = lambda n: torch.empty(n, dtype=torch.uint8)  # no CUDA here: pretend to pin
    arena.alloc(3000)
    assert arena.reserved == 4096
    with pytest.raises(ArenaFull, match="max_pinned_bytes"):
        arena.alloc(2000)  # 4096 more would pass the cap


def test_reserve_sizes_the_arena_in_one_go(backend):
    bank = make_bank(backend, chunk_bytes=4096, storage_dtype=torch.bfloat16)
    tensors = [sample((1000 + i,), torch.float32, seed=i) for i in range(50)]
    bank.reserve(tensors)  # counts bf16 storage and per-tensor alignment
    assert len(bank._arena.chunks) == 1 and bank.arena_bytes < 50 * 4096
    for i, t in enumerate(tensors):
        bank.offload(str(i), t)
    assert len(bank._arena.chunks) == 1 and bank.pageable_bytes == 0
    bank.reserve(bank.arena_bytes)  # more than is free: one more chunk
    assert len(bank._arena.chunks) == 2


def test_native_and_fallback_agree():
    if _native.load() is None:
        pytest.skip(f"native extension cannot be built here: {_native.failure_reason()}")
    results = {}
    for backend in ("native", "fallback"):
        bank = make_bank(backend, max_pinned_bytes=96 << 10, chunk_bytes=32 << 10, storage_dtype=torch.bfloat16)
        rng = random.Random(7)
        out, stats = [], []
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for step in range(200):
                name = f"t{rng.randint(0, 30)}"
                if name in bank and rng.random() < 0.5:
                    out.append(bank.restore(name))
                else:
                    dtype = rng.choice([torch.float32, torch.float16, torch.int32])
                    bank.offload(name, sample((rng.randint(0, 5000),), dtype, seed=step))
                stats.append((bank.bytes_held, bank.pinned_bytes, bank.pageable_bytes, bank.arena_bytes))
        results[backend] = (out, stats)
    (out_n, stats_n), (out_f, stats_f) = results["native"], results["fallback"]
    assert stats_n == stats_f
    for a, b in zip(out_n, out_f, strict=True):
        assert_bitwise_equal(a, b)


# ------------------------------------------------------------------------------------- FusedAdamW parking


# ----------------------------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@cuda
def test_cuda_offload_of_tensor_still_being_written(backend):
    """offload must wait for the producer on the current stream, not copy whatever is in memory at launch."""

    def produce(x):
        for _ in range(30):
            x = torch.tanh(x @ x / 2048 ** 0.5)  # queued work: x is final only when all of it has run
        return x

    bank = make_bank(backend, chunk_bytes=64 << 20)
    x0 = torch.randn(2048, 2048, device="cuda")
    x = produce(x0.clone())
    bank.offload("x", x)
    del x
    expected = produce(x0).cpu()
    assert_bitwise_equal(bank.restore("x").cpu(), expected)


def test_host_tensors_share_chunks_and_keep_their_values():
    """HostTensors (frozen layers' weights in host memory): tensors of odd sizes packed into shared chunks,
    disjoint, each keeping what was written to it."""
    from lisa_kernels.host_arena import HostTensors

    tensors = HostTensors(pin=False, chunk_bytes=1 << 20)
    shapes = [((129, 7), torch.bfloat16), ((1001,), torch.float32), ((3, 5, 11), torch.float16), ((0, 4), torch.float32)]
    made = [tensors.empty(shape, dtype) for shape, dtype in shapes]
    for t, (shape, dtype) in zip(made, shapes):
        assert t.shape == shape and t.dtype == dtype and t.is_contiguous()
    values = [sample(t.shape, t.dtype, seed=i) for i, t in enumerate(made)]
    for t, v in zip(made, values):
        t.copy_(v)
    for t, v in zip(made, values):
        assert_bitwise_equal(t, v)
    spans = sorted((t.data_ptr(), t.data_ptr() + t.nbytes) for t in made if t.numel())
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    assert len(tensors._arena.chunks) == 1  # all of them in one 1 MiB chunk


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs pinning to fail for want of a GPU")
def test_host_tensors_without_pinning_go_pageable_with_one_warning():
    from lisa_kernels.host_arena import HostTensors

    tensors = HostTensors(pin=True)
    with pytest.warns(RuntimeWarning, match="pageable") as record:
        made = [tensors.empty((10 + i,), torch.float32) for i in range(3)]
    assert len(record) == 1 and all(not t.is_pinned() for t in made)
    made[0].fill_(2.0)
    assert made[0].sum().item() == 20.0
