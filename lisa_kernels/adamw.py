"""AdamW over many tensors at once: Triton kernel -> launcher -> plain PyTorch reference and CPU path.

One launch updates every active tensor of one (param, grad, state) dtype combination. The kernel reads a table
of tensor addresses and a table of chunks (tensor index, first element), so a LISA active set of ~20 tensors or
a full model of ~300 costs one launch, not one per tensor. Each element is read once (param, grad, moments) and
written once (param, moments): 28 bytes per fp32 element, 22 for bf16 params with fp32 moments.
"""

import contextlib
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # macOS, or a CPU-only box without Triton: the PyTorch path does the work.
    triton = None

# 4096 fp32 elements a program is 16 per thread at 8 warps: four 16-byte loads per tensor, enough in flight to
# stream at bandwidth without a loop. Triton's interpreter costs ~1 ms per program, so it gets big blocks.
_CUDA_BLOCK = 4096
_CUDA_WARPS = 8
_INTERPRETER_BLOCK = 1 << 16
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class AdamWHyperparameters:
    lr: float
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    maximize: bool = False


def adamw_hyperparameters(h: AdamWHyperparameters, step: float, inv_grad_scale: float = 1.0) -> tuple:
    """The per-tensor scalars of one step, in the order the kernel reads them: gradient scale (sign for maximize,
    1 / GradScaler scale), 1 - beta1, beta2, 1 - beta2, eps, weight-decay factor, step size, sqrt of the second bias
    correction. Computed in double on the host like torch.optim.AdamW: in fp32, 1 - fp32(0.999) is off by ~1e-5."""
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
        param_ptr = _address(row, 0, PARAM, ALIGNED)
        exp_avg_ptr = _address(row, 2, STATE, ALIGNED)
        exp_avg_sq_ptr = _address(row, 3, STATE, ALIGNED)
        grad = _load_chunk(_address(row, 1, GRAD, ALIGNED), offsets, numel, MASKED) * tl.load(h)
        param = _load_chunk(param_ptr, offsets, numel, MASKED)
        exp_avg = _load_chunk(exp_avg_ptr, offsets, numel, MASKED)
        exp_avg_sq = _load_chunk(exp_avg_sq_ptr, offsets, numel, MASKED)

        param = param * tl.load(h + 5)
        exp_avg = exp_avg + tl.load(h + 1) * (grad - exp_avg)
        exp_avg_sq = exp_avg_sq * tl.load(h + 2) + tl.load(h + 3) * grad * grad
        second_moment = exp_avg_sq
        if AMSGRAD:
            max_ptr = _address(row, 4, STATE, ALIGNED)
            second_moment = tl.maximum(_load_chunk(max_ptr, offsets, numel, MASKED), exp_avg_sq)
            _store_chunk(max_ptr, offsets, numel, second_moment, MASKED)
        # IEEE-rounded sqrt and division, as torch uses: plain `/` and tl.sqrt compile to approximations on sm_90.
        denom = tl.div_rn(tl.sqrt_rn(second_moment), tl.load(h + 7)) + tl.load(h + 4)
        param = param - tl.load(h + 6) * tl.div_rn(exp_avg, denom)

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
        table,  # int64 [tensors, 6]: param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq addresses; numel
        hyper,  # float32 [tensors, 8]: `adamw_hyperparameters` of each tensor
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
        row = table + tensor * 6
        numel = tl.load(row + 5)
        h = hyper + tensor * 8
        # Masks on a size known only at run time defeat vectorisation, so only a tensor's last chunk uses them.
        if start + BLOCK <= numel:
            _adamw_chunk(row, h, offsets, numel, seed + tensor, PARAM, GRAD, STATE, AMSGRAD, STOCHASTIC_ROUNDING,
                         ALIGNED, False)
        else:
            _adamw_chunk(row, h, offsets, numel, seed + tensor, PARAM, GRAD, STATE, AMSGRAD, STOCHASTIC_ROUNDING,
                         ALIGNED, True)

    _TRITON_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}
    # Triton decides at decoration time whether a kernel is interpreted (TRITON_INTERPRET=1): then it runs on
    # CPU tensors, and only then.
    KERNEL_RUNS_ON_CPU = type(_adamw_kernel).__name__ == "InterpretedFunction"
else:
    KERNEL_RUNS_ON_CPU = False


def uses_kernel(param: torch.Tensor, grad: torch.Tensor, state: torch.Tensor) -> bool:
    """Whether the Triton kernel (rather than the PyTorch path) updates tensors of these dtypes and device."""
    if triton is None or any(t.dtype not in KERNEL_DTYPES for t in (param, grad, state)):
        return False
    return param.device.type == ("cpu" if KERNEL_RUNS_ON_CPU else "cuda")


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
    for i, (p, g, m, v, vmax, step, h) in enumerate(rows):
        shape, device, v_or_max = p.shape, p.device, v if vmax is None else vmax
        if not (g.shape == shape and m.shape == shape and v.shape == shape and v_or_max.shape == shape
                and g.device == device and m.device == device and v.device == device and v_or_max.device == device
                and v.dtype == m.dtype and v_or_max.dtype == m.dtype):
            _refuse(name(i), p, g, m, v, vmax)
        repeat = times_seen[p] = times_seen.get(p, -1) + 1
        key = (repeat, device, p.dtype, g.dtype, m.dtype, vmax is not None)
        bucket = buckets.get(key)
        if bucket is None:
            if not (p.dtype.is_floating_point and g.dtype.is_floating_point and m.dtype.is_floating_point):
                _refuse(name(i), p, g, m, v, vmax)
            bucket = buckets[key] = Bucket([], [], [], [], None if vmax is None else [], [], [])
        bucket.params.append(p)
        bucket.grads.append(g)
        bucket.exp_avgs.append(m)
        bucket.exp_avg_sqs.append(v)
        if vmax is not None:
            bucket.max_exp_avg_sqs.append(vmax)
        bucket.steps.append(step)
        bucket.hyperparameters.append(h)
    return [bucket for key, bucket in sorted(buckets.items(), key=lambda key_bucket: key_bucket[0][0])]


def update_buckets(buckets: list[Bucket], inv_grad_scale: float, stochastic_rounding: bool, block_size=None):
    """Count a step for every tensor (a param listed twice counts two), then run each bucket's launch."""
    for b in buckets:
        scalars = []
        for step, h in zip(b.steps, b.hyperparameters):
            step += 1
            scalars.append(adamw_hyperparameters(h, step.item(), inv_grad_scale))
        adamw_update_(b.params, b.grads, b.exp_avgs, b.exp_avg_sqs, b.max_exp_avg_sqs, scalars,
                      stochastic_rounding=stochastic_rounding, block_size=block_size)


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
        if all(t.is_contiguous() for t in row) or (_is_dense(p) and all(t.stride() == p.stride() for t in row)):
            continue
        for c, (column, t) in enumerate(zip(columns, row)):
            column[i] = t.contiguous()
            if c != 1 and column[i] is not t:  # column 1 holds the grads, which the kernel only reads
                copy_backs.append((t, column[i]))
    return columns, copy_backs


def _launch_kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hypers, stochastic_rounding, block):
    device = params[0].device
    block = block or (_INTERPRETER_BLOCK if KERNEL_RUNS_ON_CPU else _CUDA_BLOCK)
    numels = tuple(p.numel() for p in params)
    chunks = _chunk_table(numels, block, device)
    if len(chunks) == 0:
        return
    columns = [params, grads, exp_avgs, exp_avg_sqs] + ([max_exp_avg_sqs] if max_exp_avg_sqs is not None else [])
    (params, grads, exp_avgs, exp_avg_sqs, *maxes), copy_backs = _walkable(columns)
    max_exp_avg_sqs = maxes[0] if maxes else None
    amsgrad = max_exp_avg_sqs is not None
    rows = [[p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), vmax.data_ptr(), n]
            for p, g, m, v, vmax, n in zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs or exp_avg_sqs, numels)]
    table = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
    hyper = torch.tensor(hypers, dtype=torch.float32).to(device, non_blocking=True)
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


def _update_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hypers, stochastic_rounding):
    """The PyTorch path (CPU and devices without Triton): the same math as the kernel, in fp32, with foreach ops."""
    scale, one_minus_beta1, beta2, one_minus_beta2, eps, decay, step_size, bc2_sqrt = map(list, zip(*hypers))
    f32 = [p.float() for p in params]
    g32 = [g.float() for g in grads]
    if any(s != 1.0 for s in scale):  # GradScaler or maximize: one more pass, only when needed
        g32 = torch._foreach_mul(g32, scale)
    m32 = [m.float() for m in exp_avgs]
    v32 = [v.float() for v in exp_avg_sqs]
    torch._foreach_mul_(f32, decay)
    delta = torch._foreach_sub(g32, m32)
    torch._foreach_mul_(delta, one_minus_beta1)
    torch._foreach_add_(m32, delta)
    torch._foreach_mul_(v32, beta2)
    torch._foreach_addcmul_(v32, g32, g32, one_minus_beta2)
    second_moment = v32
    if max_exp_avg_sqs is not None:
        second_moment = torch._foreach_maximum([v.float() for v in max_exp_avg_sqs], v32)
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


def adamw_update_(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hypers, *, stochastic_rounding=False,
                  block_size=None):
    """Update tensors of one device and one (param, grad, state) dtype combination: one kernel launch.

    `hypers` holds one `adamw_hyperparameters` tuple per tensor; `max_exp_avg_sqs` is None without amsgrad.
    """
    if not params:
        return
    if uses_kernel(params[0], grads[0], exp_avgs[0]):
        _launch_kernel(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hypers, stochastic_rounding, block_size)
    else:
        _update_foreach(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, hypers, stochastic_rounding)


def fused_adamw_(params, grads, exp_avgs, exp_avg_sqs, steps, *, lr, beta1, beta2, eps, weight_decay,
                 amsgrad=False, max_exp_avg_sqs=None, maximize=False, grad_scale=None, found_inf=None,
                 stochastic_rounding=False, block_size=None):
    """Functional AdamW for trainers that keep their own state; updates params and moments in place.

    `steps` are scalar tensors (as in torch.optim.AdamW's state), incremented here before use. With GradScaler
    tensors, grads are unscaled in the kernel and nothing changes when `found_inf` is set (one host sync).
    Tensors are grouped by device and dtype combination; each group is one kernel launch.
    """
    lists = (params, grads, exp_avgs, exp_avg_sqs, steps) + ((max_exp_avg_sqs,) if amsgrad else ())
    if amsgrad and max_exp_avg_sqs is None:
        raise ValueError("amsgrad=True needs max_exp_avg_sqs")
    if len({len(x) for x in lists}) != 1:
        raise ValueError(f"params, grads, exp_avgs, exp_avg_sqs, steps differ in length: {[len(x) for x in lists]}")
    inv_grad_scale = _unscale_factor(grad_scale, found_inf)
    if inv_grad_scale is None:
        return
    h = AdamWHyperparameters(float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), maximize)
    rows = zip(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs if amsgrad else [None] * len(params), steps,
               [h] * len(params))
    buckets = bucket_tensors(rows, lambda i: f"fused_adamw_: params[{i}]")
    update_buckets(buckets, inv_grad_scale, stochastic_rounding, block_size)


def _unscale_factor(grad_scale, found_inf):
    """1 / grad_scale, or None when the step must be skipped because GradScaler found an inf or a NaN."""
    if found_inf is not None and bool(found_inf.item()):
        return None
    return 1.0 if grad_scale is None else 1.0 / float(grad_scale)


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
