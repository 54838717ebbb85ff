"""AdamW over many tensors at once: Triton kernel -> launchers (one per path) -> plain PyTorch reference.

Three paths, chosen by arguments as torch's `adamw()` chooses its own (`choose_path`):
- "triton" (`fused=None|True` on CUDA): one launch updates every tensor of one (param, grad, state) dtype
  combination. The kernel reads a table of tensor addresses and a table of chunks (tensor index, first element), so
  a LISA active set of ~20 tensors or a full model of ~300 costs one launch, not one per tensor. Each element is
  read once (param, grad, moments) and written once (param, moments): 28 bytes per fp32 element, 22 for bf16
  params with fp32 moments. With `triton_on_cpu=True` and `TRITON_INTERPRET=1` set before import,
  Triton's interpreter runs the same kernel on CPU tensors: that is how the tests check the kernel without a GPU.
- "torch_fused" (`fused=None|True` on CPU): torch's own fused CPU kernel, `torch._fused_adamw_`, which is several
  times faster than foreach ops there. Where the dtypes differ (bf16 params with fp32 moments) it runs on fp32
  working copies of the narrower tensors, written back once.
- "foreach" (`foreach=True` or `fused=False`, and devices without a Triton kernel): torch `_foreach` ops.
Every path computes in fp32, or in fp64 for fp64 params (fp64 never goes to the kernel). Each runs inside the
custom op `lisa_kernels::adamw_`, so `torch.compile` traces a step around it without a graph break.

The file stays whole (~560 lines), laid out as every op file of the package is: kernel, launchers, custom op, then
the reference, so the plain PyTorch definition sits beside the code it checks.
"""

import contextlib
import math
from typing import NamedTuple

import torch

from ._triton import INTERPRETED as TRITON_INTERPRETED
from ._triton import tl, triton

# 4096 fp32 elements a program is 16 per thread at 8 warps: four 16-byte loads per tensor, enough in flight to
# stream at bandwidth without a loop. Triton's interpreter costs ~1 ms per program, so it gets big blocks.
_CUDA_BLOCK = 4096
_CUDA_WARPS = 8
_INTERPRETER_BLOCK = 1 << 16
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

_constexpr = tl.constexpr if triton is not None else int
# Columns of the kernel's tensor table (int64, one row per tensor): addresses, then the element count.
PARAM_ADDRESS, GRAD_ADDRESS, EXP_AVG_ADDRESS, EXP_AVG_SQ_ADDRESS, MAX_EXP_AVG_SQ_ADDRESS, NUMEL = map(
    _constexpr, range(6))
TABLE_COLUMNS = _constexpr(6)
# Columns of the kernel's scalar table (fp32, one row per tensor), in the order `kernel_scalars` returns them.
GRAD_SCALE, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, EPS, DECAY, STEP_SIZE, BIAS_CORRECTION2_SQRT = map(
    _constexpr, range(8))
SCALAR_COLUMNS = _constexpr(8)


class AdamWHyperparameters(NamedTuple):
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False


def kernel_scalars(h: AdamWHyperparameters, step: float, inv_grad_scale: float = 1.0) -> tuple:
    """The scalars one step of one tensor needs, derived from its group's hyperparameters and its step count, in
    the kernel's column order: gradient scale (1 / GradScaler scale, negated for maximize), 1 - beta1, beta2,
    1 - beta2, eps, weight-decay factor, step size, sqrt of the second bias correction. Computed in double on the
    host like torch.optim.AdamW: in fp32, 1 - fp32(0.999) is off by ~1e-5."""
    bias_correction1 = 1 - h.beta1**step
    bias_correction2 = 1 - h.beta2**step
    return (
        -inv_grad_scale if h.maximize else inv_grad_scale,
        1 - h.beta1,
        h.beta2,
        1 - h.beta2,
        h.eps,
        1 - h.lr * h.weight_decay,
        h.lr / bias_correction1,
        math.sqrt(bias_correction2),
    )


if triton is not None:

    @triton.jit
    def _address(row, column, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
        ptr = tl.load(row + column).to(tl.pointer_type(DTYPE))
        if ALIGNED:  # loaded addresses carry no alignment facts; without this hint every access is scalar
            ptr = tl.multiple_of(ptr, 16)
        return ptr

    @triton.jit
    def _load_chunk(ptr, offsets, numel, MASKED: tl.constexpr):
        if MASKED:
            return tl.load(ptr + offsets, mask=offsets < numel).to(tl.float32)
        else:
            return tl.load(ptr + offsets).to(tl.float32)

    @triton.jit
    def _store_chunk(ptr, offsets, numel, value, MASKED: tl.constexpr):
        if MASKED:
            tl.store(ptr + offsets, value.to(ptr.dtype.element_ty), mask=offsets < numel)
        else:
            tl.store(ptr + offsets, value.to(ptr.dtype.element_ty))

    @triton.jit
    def _adamw_chunk(row, h, offsets, numel, seed, PARAM: tl.constexpr, GRAD: tl.constexpr, STATE: tl.constexpr,
                     AMSGRAD: tl.constexpr, STOCHASTIC_ROUNDING: tl.constexpr, ALIGNED: tl.constexpr,
                     MASKED: tl.constexpr):
        param_ptr = _address(row, PARAM_ADDRESS, PARAM, ALIGNED)
        exp_avg_ptr = _address(row, EXP_AVG_ADDRESS, STATE, ALIGNED)
        exp_avg_sq_ptr = _address(row, EXP_AVG_SQ_ADDRESS, STATE, ALIGNED)
        grad = _load_chunk(_address(row, GRAD_ADDRESS, GRAD, ALIGNED), offsets, numel, MASKED) * tl.load(h + GRAD_SCALE)
        param = _load_chunk(param_ptr, offsets, numel, MASKED)
        exp_avg = _load_chunk(exp_avg_ptr, offsets, numel, MASKED)
        exp_avg_sq = _load_chunk(exp_avg_sq_ptr, offsets, numel, MASKED)

        param = param * tl.load(h + DECAY)
        exp_avg = exp_avg + tl.load(h + ONE_MINUS_BETA1) * (grad - exp_avg)
        exp_avg_sq = exp_avg_sq * tl.load(h + BETA2) + tl.load(h + ONE_MINUS_BETA2) * grad * grad
        second_moment = exp_avg_sq
        if AMSGRAD:
            max_ptr = _address(row, MAX_EXP_AVG_SQ_ADDRESS, STATE, ALIGNED)
            second_moment = tl.maximum(_load_chunk(max_ptr, offsets, numel, MASKED), exp_avg_sq)
            _store_chunk(max_ptr, offsets, numel, second_moment, MASKED)
        # IEEE-rounded sqrt and division, as torch uses: plain `/` and tl.sqrt compile to approximations on sm_90.
        denom = tl.div_rn(tl.sqrt_rn(second_moment), tl.load(h + BIAS_CORRECTION2_SQRT)) + tl.load(h + EPS)
        param = param - tl.load(h + STEP_SIZE) * tl.div_rn(exp_avg, denom)

        if STOCHASTIC_ROUNDING:
            # Add 16 random bits below bf16's mantissa, then truncate: rounds up with probability equal to the
            # distance, so updates smaller than half an ulp still move the weight on average.
            noise = tl.randint(seed, offsets).to(tl.int32) & 0xFFFF
            param = ((param.to(tl.int32, bitcast=True) + noise) & -65536).to(tl.float32, bitcast=True)
        _store_chunk(param_ptr, offsets, numel, param, MASKED)
        _store_chunk(exp_avg_ptr, offsets, numel, exp_avg, MASKED)
        _store_chunk(exp_avg_sq_ptr, offsets, numel, exp_avg_sq, MASKED)

    @triton.jit
    def _adamw_kernel(
        table,  # int64 [tensors, TABLE_COLUMNS]
        hyper,  # float32 [tensors, SCALAR_COLUMNS]: `kernel_scalars` of each tensor
        chunks,  # int64 [programs, 2]: tensor index, first element
        seed,
        PARAM: tl.constexpr,
        GRAD: tl.constexpr,
        STATE: tl.constexpr,
        AMSGRAD: tl.constexpr,
        STOCHASTIC_ROUNDING: tl.constexpr,
        ALIGNED: tl.constexpr,  # every address is a multiple of 16 bytes: vector loads and stores
        BLOCK: tl.constexpr,
    ):
        pid = tl.program_id(0)
        tensor = tl.load(chunks + 2 * pid)
        start = tl.multiple_of(tl.load(chunks + 2 * pid + 1), BLOCK)
        offsets = start + tl.arange(0, BLOCK)
        row = table + tensor * TABLE_COLUMNS
        numel = tl.load(row + NUMEL)
        h = hyper + tensor * SCALAR_COLUMNS
        # Masks on a size known only at run time defeat vectorisation, so only a tensor's last chunk uses them.
        if start + BLOCK <= numel:
            _adamw_chunk(row, h, offsets, numel, seed + tensor, PARAM, GRAD, STATE, AMSGRAD, STOCHASTIC_ROUNDING,
                         ALIGNED, False)
        else:
            _adamw_chunk(row, h, offsets, numel, seed + tensor, PARAM, GRAD, STATE, AMSGRAD, STOCHASTIC_ROUNDING,
                         ALIGNED, True)

    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


def choose_path(device: torch.device, param_dtype, grad_dtype, state_dtype, *, fused=None, foreach=None,
                triton_on_cpu=False) -> str:
    """"triton", "torch_fused" or "foreach" for tensors of this device and dtypes, as the module docstring says."""
    if foreach or fused is False:
        return "foreach"
    if param_dtype == torch.float64:
        return "torch_fused" if device.type == "cpu" else "foreach"  # exact fp64: never through the fp32 kernel
    kernel_devices = ("cuda", "cpu") if triton_on_cpu else ("cuda",)
    if triton is not None and device.type in kernel_devices and all(
            d in KERNEL_DTYPES for d in (param_dtype, grad_dtype, state_dtype)):
        if device.type == "cpu" and not TRITON_INTERPRETED:
            raise RuntimeError("triton_on_cpu=True runs the kernel through Triton's interpreter: set "
                               "TRITON_INTERPRET=1 before importing lisa_kernels")
        return "triton"
    return "torch_fused" if device.type == "cpu" else "foreach"


def _is_dense(t: torch.Tensor) -> bool:
    """The elements fill a block of memory exactly once, in some order (contiguous, channels_last, transposed)."""
    expected = 1
    for size, stride in sorted(zip(t.shape, t.stride()), key=lambda size_stride: size_stride[1]):
        if size != 1 and stride != expected:
            return False
        expected *= size
    return True


def _refuse(where: str, param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq) -> None:
    """Raise, as torch does (RuntimeError), for what no path can update, naming the parameter (`where`)."""
    if not param.is_floating_point():
        raise RuntimeError(f"{where} is {param.dtype}; AdamW updates floating-point parameters only")
    for name, t in (("grad", grad), ("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq),
                    ("max_exp_avg_sq", max_exp_avg_sq)):
        if t is None:
            continue
        if t.shape != param.shape:
            raise RuntimeError(f"{where} (shape {tuple(param.shape)}) has {name} of shape {tuple(t.shape)}")
        if t.device != param.device:
            raise RuntimeError(f"{where} is on {param.device} but its {name} is on {t.device}")
        if not t.is_floating_point():
            raise RuntimeError(f"{where} has {name} of dtype {t.dtype}; it must be floating point")
        if name != "grad" and t.dtype != exp_avg.dtype:
            raise RuntimeError(f"{where} has exp_avg in {exp_avg.dtype} but {name} in {t.dtype}")
    raise RuntimeError(f"{where}: its grad and moments do not match it")


class Bucket(NamedTuple):
    """Tensors of one device and one (param, grad, moment) dtype combination: one launch."""

    params: list
    grads: list
    exp_avgs: list
    exp_avg_sqs: list
    max_exp_avg_sqs: list | None  # None without amsgrad
    steps: list  # scalar tensors
    hyperparameters: list  # AdamWHyperparameters of each tensor's group


def bucket_tensors(rows, name) -> list[Bucket]:
    """Group rows (param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq or None, step, hyperparameters) into launches.

    Every row is checked first, so a refused call changes nothing: grad and moments must have the param's shape
    and device, dtypes must be floating point, the moments one dtype; else RuntimeError (as torch raises) naming
    row i by `name(i)`. This runs for every tensor of every step, so each attribute is read once and dtypes are
    checked once per bucket. A param listed twice (torch warns, then updates it twice in turn) gets its second
    update in a later launch, so no launch writes one tensor from two places.
    """
    buckets, times_seen = {}, {}
    for i, row in enumerate(rows):
        p, g, m, v, vmax, step, h = row
        shape, device, v_or_max = p.shape, p.device, v if vmax is None else vmax
        if not (g.shape == shape and m.shape == shape and v.shape == shape and v_or_max.shape == shape
                and g.device == device and m.device == device and v.device == device and v_or_max.device == device
                and v.dtype == m.dtype and v_or_max.dtype == m.dtype):
            _refuse(name(i), p, g, m, v, vmax)
        repeat = times_seen.get(id(p), 0)  # id: a tensor's own __hash__ is a Python call, 3x slower
        times_seen[id(p)] = repeat + 1
        key = (repeat, device, p.dtype, g.dtype, m.dtype, vmax is not None)
        bucket_rows = buckets.get(key)
        if bucket_rows is None:
            if not (p.dtype.is_floating_point and g.dtype.is_floating_point and m.dtype.is_floating_point):
                _refuse(name(i), p, g, m, v, vmax)
            bucket_rows = buckets[key] = []
        bucket_rows.append(row)
    result = []
    for key in sorted(buckets, key=lambda key: key[0]):
        params, grads, exp_avgs, exp_avg_sqs, maxes, steps, hyperparameters = map(list, zip(*buckets[key]))
        result.append(Bucket(params, grads, exp_avgs, exp_avg_sqs, maxes if key[-1] else None, steps,
                             hyperparameters))
    return result


def update_buckets(buckets: list[Bucket], *, fused=None, foreach=None, triton_on_cpu=False, grad_scale=None,
                   stochastic_rounding=False, block_size=None) -> None:
    """Count a step for every tensor (a param listed twice counts two, in turn), then update each bucket on its
    path. `grad_scale`: GradScaler's scale tensor, or None."""
    for b in buckets:
        path = choose_path(b.params[0].device, b.params[0].dtype, b.grads[0].dtype, b.exp_avgs[0].dtype,
                           fused=fused, foreach=foreach, triton_on_cpu=triton_on_cpu)
        torch._foreach_add_(b.steps, 1)
        if torch.compiler.is_compiling():
            flat = [float(x) for h in b.hyperparameters for x in h]
            torch.ops.lisa_kernels.adamw_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs or [],
                                          b.steps, flat, grad_scale, stochastic_rounding, block_size or 0, path)
        else:  # the dispatcher's checks on every listed tensor cost ~5 us a tensor: fp32 CPU steps took 1.2x torch's
            _update_bucket(b, grad_scale, stochastic_rounding, block_size, path)


def _update_bucket(b: Bucket, grad_scale, stochastic_rounding: bool, block_size, path: str) -> None:
    if path == "torch_fused":
        _update_torch_fused(b, grad_scale, stochastic_rounding)
        return
    inv_grad_scale = 1.0 if grad_scale is None else 1.0 / float(grad_scale)
    scalars = [kernel_scalars(h, step.item(), inv_grad_scale) for h, step in zip(b.hyperparameters, b.steps)]
    if path == "triton":
        _launch_kernel(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, scalars,
                       stochastic_rounding, block_size)
    else:
        _update_foreach(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, scalars,
                        stochastic_rounding)


def _update_torch_fused(b: Bucket, grad_scale, stochastic_rounding: bool) -> None:
    """torch._fused_adamw_, once per group of equal hyperparameters (it takes them as scalars), on the bucket's
    tensors, or on fp32 working copies where dtypes differ (`_fused_on_working_copies`). Tensors in a layout it
    cannot walk go through contiguous copies (it walks memory like the kernel: a strided view gave wrong updates)."""
    columns = [b.params, b.grads, b.exp_avgs, b.exp_avg_sqs] + ([b.max_exp_avg_sqs] if b.max_exp_avg_sqs else [])
    columns, copy_backs = _walkable(columns)
    amsgrad = len(columns) == 5
    groups = {}
    for i, h in enumerate(b.hyperparameters):
        groups.setdefault(h, []).append(i)
    same_dtype = len({column[0].dtype for column in columns}) == 1
    for h, rows in groups.items():
        picked = [[column[i] for i in rows] for column in columns]
        steps = [b.steps[i] for i in rows]
        kwargs = dict(lr=h.lr, beta1=h.beta1, beta2=h.beta2, weight_decay=h.weight_decay, eps=h.eps, amsgrad=amsgrad,
                      maximize=h.maximize, grad_scale=grad_scale)
        if same_dtype:
            torch._fused_adamw_(*picked[:4], picked[4] if amsgrad else [], steps, **kwargs)
        else:
            _fused_on_working_copies(picked, steps, kwargs, stochastic_rounding)
    for original, copy in copy_backs:
        original.copy_(copy)


# Elements per batch of working copies. At 2^18 the fp32 copies of a batch's params and grads (1 MiB each) stay
# in cache from the upcast through torch's fused kernel to the write-back; whole-tensor copies went out to memory
# and back (bf16 params, 200 x 30,000 elements, one thread: 17 ms a step whole, 8.5 ms batched, best of 30).
_WORKING_BATCH = 1 << 18


def _batches(numels: list, limit: int) -> list:
    """Lists of (tensor index, first element, end) pieces, at most `limit` elements a list; big tensors are cut."""
    batches, batch, size = [], [], 0
    for i, numel in enumerate(numels):
        for start in range(0, numel, limit):
            end = min(start + limit, numel)
            if size + end - start > limit:
                batches.append(batch)
                batch, size = [], 0
            batch.append((i, start, end))
            size += end - start
    return batches + [batch] if batch else batches


def _fused_on_working_copies(columns: list, steps: list, kwargs: dict, stochastic_rounding: bool) -> None:
    """torch._fused_adamw_ needs one dtype: tensors narrower than the compute dtype (fp32, fp64 for fp64 params)
    are copied up batch by batch into one scratch buffer, and params and moments copied back (params with
    stochastic rounding when asked). Every tensor is dense and the tensors of one row share strides (`_walkable`),
    so flat views in memory order line up."""
    compute = torch.promote_types(columns[0][0].dtype, torch.float32)
    upcast = [column[0].dtype != compute for column in columns]
    scratch = torch.empty(sum(upcast), _WORKING_BATCH, dtype=compute, device=columns[0][0].device)
    flat = [[t.as_strided((t.numel(),), (1,)) for t in column] for column in columns]
    for batch in _batches([p.numel() for p in columns[0]], _WORKING_BATCH):
        pieces = [[column[i][start:end] for i, start, end in batch] for column in flat]
        working, row = [], 0
        for c, column_pieces in enumerate(pieces):
            if not upcast[c]:
                working.append(column_pieces)
                continue
            copies, offset = [], 0
            for piece in column_pieces:
                copies.append(scratch[row, offset:offset + piece.numel()])
                offset += piece.numel()
            torch._foreach_copy_(copies, column_pieces)
            working.append(copies)
            row += 1
        amsgrad = len(working) == 5
        torch._fused_adamw_(*working[:4], working[4] if amsgrad else [], [steps[i] for i, _, _ in batch], **kwargs)
        for c in [c for c in range(len(pieces)) if upcast[c] and c != 1]:  # column 1: grads, only read
            if c == 0 and stochastic_rounding and pieces[0][0].dtype == torch.bfloat16:
                for dst, value in zip(pieces[0], working[0]):
                    dst.copy_(round_to_bfloat16_stochastic(value))
            else:
                torch._foreach_copy_(pieces[c], working[c])


_chunk_tables: dict = {}


def _chunk_table(numels: tuple, block: int, device: torch.device) -> torch.Tensor:
    """(tensor index, first element) of every block-sized chunk; cached, since the active set changes rarely."""
    key = (numels, block, device)
    table = _chunk_tables.get(key)
    if table is None:
        counts = torch.tensor([-(-n // block) for n in numels], dtype=torch.int64)
        tensor_index = torch.repeat_interleave(torch.arange(len(numels)), counts)
        first_chunk = torch.cumsum(counts, 0) - counts
        start = (torch.arange(len(tensor_index)) - first_chunk[tensor_index]) * block
        table = torch.stack([tensor_index, start], dim=1).to(device)
        if len(_chunk_tables) >= 64:
            _chunk_tables.clear()
        _chunk_tables[key] = table
    return table


def _walkable(columns: list) -> tuple[list, list]:
    """The kernel walks each tensor's memory from its first element as if it were the parameter's, which is right
    when every tensor of a row is contiguous, or all share the strides of a dense parameter (channels_last,
    transposed). Returns the columns with other rows replaced by contiguous copies, and the (original, copy) pairs
    the kernel writes (params and moments), to copy back after it ran."""
    columns, copy_backs = [list(column) for column in columns], []
    for i, row in enumerate(zip(*columns)):
        p = row[0]
        if all(map(torch.Tensor.is_contiguous, row)) or (_is_dense(p) and all(t.stride() == p.stride() for t in row)):
            continue
        for c, (column, t) in enumerate(zip(columns, row)):
            column[i] = t.contiguous()
            if c != 1 and column[i] is not t:  # column 1 holds the grads, which the kernel only reads
                copy_backs.append((t, column[i]))
    return columns, copy_backs


def _launch_kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, stochastic_rounding,
                   block=None):
    device = params[0].device
    block = block or (_CUDA_BLOCK if device.type == "cuda" else _INTERPRETER_BLOCK)
    numels = tuple(p.numel() for p in params)
    chunks = _chunk_table(numels, block, device)
    if len(chunks) == 0:
        return
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if max_exp_avg_sqs is not None else [])
    (params, grads, exp_avgs, exp_avg_sqs, *maxes), copy_backs = _walkable(columns)
    max_exp_avg_sqs = maxes[0] if maxes else None
    amsgrad = max_exp_avg_sqs is not None
    rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), vmax.data_ptr(), n]
            for p, g, m, v, vmax, n in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or exp_avg_sqs,
                                           numels)]
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    hyper = torch.tensor(scalars, dtype=torch.float32).to(device, non_blocking=True)
    aligned = all(address % 16 == 0 for row in rows for address in row[:5])
    seed = int(torch.randint(0, 2**31 - 1, ())) if stochastic_rounding else 0
    launch = _adamw_kernel[(len(chunks),)]
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        launch(
            table,
            hyper,
            chunks,
            seed,
            PARAM=_TRITON_DTYPES[params[0].dtype],
            GRAD=_TRITON_DTYPES[grads[0].dtype],
            STATE=_TRITON_DTYPES[exp_avgs[0].dtype],
            AMSGRAD=amsgrad,
            STOCHASTIC_ROUNDING=stochastic_rounding and params[0].dtype == torch.bfloat16,
            ALIGNED=aligned,
            BLOCK=block,
            num_warps=_CUDA_WARPS,
        )
    for original, working in copy_backs:
        original.copy_(working)


def round_to_bfloat16_stochastic(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 -> bf16, rounding up with probability equal to the distance to the next bf16 value."""
    noise = torch.randint(0, 1 << 16, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    return ((x.view(torch.int32) + noise) & -65536).view(torch.float32).to(torch.bfloat16)


def _write_param(dst: torch.Tensor, value: torch.Tensor, stochastic_rounding: bool) -> None:
    if stochastic_rounding and dst.dtype == torch.bfloat16 and value.dtype == torch.float32:
        value = round_to_bfloat16_stochastic(value)
    dst.copy_(value)


def _update_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, scalars, stochastic_rounding):
    """The foreach path: the kernel's math with `_foreach` ops, in fp32 (fp64 for fp64 params). `scalars`: one
    `kernel_scalars` tuple per tensor."""
    scale, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt = map(list, zip(*scalars))
    compute = torch.promote_types(params[0].dtype, torch.float32)
    f32 = [p.to(compute) for p in params]
    g32 = [g.to(compute) for g in grads]
    if any(s != 1.0 for s in scale):  # GradScaler or maximize: one more pass, only when needed
        g32 = torch._foreach_mul(g32, scale)
    m32 = [m.to(compute) for m in exp_avgs]
    v32 = [v.to(compute) for v in exp_avg_sqs]
    torch._foreach_mul_(f32, decay)
    delta = torch._foreach_sub(g32, m32)
    torch._foreach_mul_(delta, one_minus_beta1)
    torch._foreach_add_(m32, delta)
    torch._foreach_mul_(v32, beta2)
    torch._foreach_addcmul_(v32, g32, g32, one_minus_beta2)
    second_moment = v32
    if max_exp_avg_sqs is not None:
        second_moment = torch._foreach_maximum([v.to(compute) for v in max_exp_avg_sqs], v32)
        for dst, value in zip(max_exp_avg_sqs, second_moment):
            dst.copy_(value)
    denom = torch._foreach_sqrt(second_moment)
    torch._foreach_div_(denom, bc2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(f32, m32, denom, [-s for s in step_size])
    for dst, value in zip(params, f32):
        if dst is not value:
            _write_param(dst, value, stochastic_rounding)
    for dsts, values in ((exp_avgs, m32), (exp_avg_sqs, v32)):
        for dst, value in zip(dsts, values):
            if dst is not value:
                dst.copy_(value)


def adamw_(params: list[torch.Tensor], grads: list[torch.Tensor], exp_avgs: list[torch.Tensor],
           exp_avg_sqs: list[torch.Tensor], max_exp_avg_sqs: list[torch.Tensor], steps: list[torch.Tensor],
           hyperparameters: list[float], grad_scale: torch.Tensor | None, stochastic_rounding: bool,
           block_size: int, path: str) -> None:
    """The custom op `torch.compile` records for one bucket: tensors of one device and one (param, grad, state)
    dtype combination, updated in place on `path` ("triton", "torch_fused" or "foreach"). `steps` are already
    counted; `hyperparameters` holds each tensor's AdamWHyperparameters, flattened; `max_exp_avg_sqs` is empty
    without amsgrad. Called directly, torch's fused kernel failed functionalization in a compiled forward +
    backward + step (torch 2.13), and the Triton launcher reads addresses, which traced tensors do not have."""
    if not params:
        return
    width = len(AdamWHyperparameters._fields)
    hypers = [AdamWHyperparameters(*hyperparameters[i:i + width - 1], maximize=bool(hyperparameters[i + width - 1]))
              for i in range(0, len(hyperparameters), width)]
    bucket = Bucket(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or None, steps, hypers)
    _update_bucket(bucket, grad_scale, stochastic_rounding, block_size or None, path)


_adamw_op = torch.library.custom_op("lisa_kernels::adamw_", adamw_,
                                    mutates_args=("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs"))


@_adamw_op.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, hyperparameters, grad_scale,
      stochastic_rounding, block_size, path) -> None:
    return None


def fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                 amsgrad=False, max_exp_avg_sqs=None, maximize=False, grad_scale=None, found_inf=None,
                 stochastic_rounding=False, fused=None, foreach=None, triton_on_cpu=False, block_size=None):
    """Functional AdamW for trainers that keep their own state; updates params and moments in place.

    `steps` are scalar tensors (as in torch.optim.AdamW's state), incremented here before use. With GradScaler
    tensors, grads are unscaled on the way and nothing changes when `found_inf` is set (one host sync). Tensors
    are grouped by device and dtype combination; each group is one launch, on the path `fused`, `foreach` and
    `triton_on_cpu` choose (see the module docstring).
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps) + ((max_exp_avg_sqs,) if amsgrad else ())
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"params, grads, exp_avgs, exp_avg_sqs, steps differ in length: {[len(x) for x in lists]}")
    if skip_step(found_inf):
        return
    h = AdamWHyperparameters(float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), maximize)
    rows = zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [None] * len(params), steps,
               [h] * len(params))
    buckets = bucket_tensors(rows, lambda i: f"fused_adamw_: params[{i}]")
    update_buckets(buckets, fused=fused, foreach=foreach, triton_on_cpu=triton_on_cpu, grad_scale=grad_scale,
                   stochastic_rounding=stochastic_rounding, block_size=block_size)


def skip_step(found_inf) -> bool:
    """Whether GradScaler found an inf or a NaN in this step's grads (one host sync, only under GradScaler)."""
    return found_inf is not None and bool(found_inf.item())


def adamw_reference(param, grad, exp_avg, exp_avg_sq, step, *, lr, beta1, beta2, eps, weight_decay,
                    max_exp_avg_sq=None, maximize=False, upcast=False):
    """One AdamW step on one tensor, written as the paper states it; updates the tensors in place.

    Computes in fp32 (like the kernel) or, with `upcast`, in fp64, and rounds once when writing back. `step` is the
    step number after incrementing (1 on the first step).
    """
    compute = torch.float64 if upcast else torch.float32
    g = grad.to(compute) * (-1 if maximize else 1)
    p = param.to(compute) * (1 - lr * weight_decay)
    m = exp_avg.to(compute) * beta1 + g * (1 - beta1)
    v = exp_avg_sq.to(compute) * beta2 + g * g * (1 - beta2)
    if max_exp_avg_sq is not None:
        v_hat = torch.maximum(max_exp_avg_sq.to(compute), v)
        max_exp_avg_sq.copy_(v_hat)
    else:
        v_hat = v
    m_hat = m / (1 - beta1**step)
    v_hat = v_hat / (1 - beta2**step)
    param.copy_(p - lr * m_hat / (v_hat.sqrt() + eps))
    exp_avg.copy_(m)
    exp_avg_sq.copy_(v)
