"""Whole tensors and this rank's FSDP shards: a one-process checkpoint (whole tensors) resumed under FSDP, each rank
cutting its own shards out without communication, and the final model of an FSDP run written in Hugging Face format
by gathering one whole tensor at a time to rank 0."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from .checkpoint import CheckpointWriteError, write_failure_reason
from .sharded_storage import (
    is_sharded,
    numel,
    safetensors_dtype,
    shard_layout,
    unique_tensors,
    write_safetensors_header,
    write_tensor,
)

__all__ = ["load_full_weights", "save_sharded_model", "shard_checkpoint_state"]

# transformers 4's max_shard_size ("5GB"; transformers 5 writes 50 GB files): a loader that reads the model file by
# file holds at most 5 GB of it at once (a 70B bf16 model: 28 files of 140 GB).
MAX_SHARD_BYTES = 5 * 10**9



def local_shard(full, like: torch.Tensor):
    """This rank's shard of the whole tensor `full`, cut as the DTensor `like` is, where `full` is (a checkpoint's
    CPU tensor stays on the CPU: `distribute_tensor` would first copy all of it to the GPU); a copy, so the whole
    tensor can go. Scalars and tensors of unsharded parameters as they are. No communication."""
    if not (is_sharded(like) and isinstance(full, torch.Tensor) and full.dim() > 0):
        return full
    shape, offset = shard_layout(like)
    piece = full.detach()
    for dim, (size, start) in enumerate(zip(shape, offset)):
        piece = piece.narrow(dim, start, size)
    return piece.clone()


def shard_entry(entry: dict, param: torch.Tensor) -> dict:
    """One parameter's optimizer state of whole tensors, cut to this rank's shard of the DTensor `param`.

    An input embedding's row-sparse state (`lisa_kernels.sparse_rows`: moments of the rows that have had a gradient
    only) has no shards: it is expanded to the dense moments it stands for (zeros in the other rows; its one step
    count is the parameter's, as in dense AdamW, so the rows without state are exactly rows whose moments stayed
    zero)."""
    from lisa_kernels import sparse_rows

    if sparse_rows.ROWS in entry:
        entry = dict(entry)
        sparse_rows.expand(entry, torch.empty(param.shape, dtype=torch.bool))  # the full shape, CPU
    return {k: local_shard(v, param) for k, v in entry.items()}


def own_sparse_rows(optimizer, saved_groups: list[dict]) -> list[dict]:
    """Saved parameter groups, each keeping this optimizer's own `sparse_rows` setting (a sharded run has dense
    embedding state)."""
    return [{**saved, "sparse_rows": group.get("sparse_rows", False)} if "sparse_rows" in saved else saved
            for group, saved in zip(optimizer.param_groups, saved_groups)]


def load_full_weights(model: nn.Module, weights: dict[str, torch.Tensor], source: str) -> None:
    """Copy whole weights (a one-process checkpoint's) into the sharded `model`: each rank keeps its own shard (no
    communication). Every parameter and persistent buffer must be in `weights`, once (a tied parameter under any
    of its names)."""
    loaded = set()
    for name, t in model.state_dict(keep_vars=True).items():
        if name not in weights:
            if id(t) in loaded:
                continue
            raise KeyError(f"{source}: no weights for {name!r}")
        full = weights[name]
        if tuple(full.shape) != tuple(t.shape):
            raise ValueError(f"{source}: {name!r} has shape {tuple(full.shape)}, the model {tuple(t.shape)}")
        with torch.no_grad():
            if is_sharded(t):
                t.to_local().copy_(local_shard(full, t))
            else:
                t.copy_(full)
        loaded.add(id(t))


def shard_checkpoint_state(payload: dict, model: nn.Module, optimizer) -> dict:
    """A one-process checkpoint's state (whole tensors) with the optimizer's moments and the period-start weights
    cut to this rank's shards, ready for the usual `load_state_dict` calls; each group keeps its own
    `sparse_rows` setting instead of the saved one."""
    from lisa_kernels.state_parking import saved_ids_and_params

    saved_groups = payload["optimizer"]["param_groups"]
    param_of = dict(saved_ids_and_params(optimizer, payload["optimizer"]))
    state = {i: shard_entry(entry, param_of[i]) for i, entry in payload["optimizer"]["state"].items()}
    period_start = payload.get("period_start")
    if period_start is not None:
        by_name = dict(model.named_parameters())
        period_start = {**period_start, "snapshots": {name: local_shard(t, by_name[name]) for name, t
                                                      in period_start["snapshots"].items()}}
    return {**payload, "optimizer": {**payload["optimizer"], "param_groups": own_sparse_rows(optimizer, saved_groups),
                                     "state": state}, "period_start": period_start}


# ------------------------------------------------------------------------------------------ the final model


def save_sharded_model(model: nn.Module, path: str | Path, parallel, tokenizer=None,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write an FSDP model in Hugging Face format (``from_pretrained`` loads it): ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each plus
    ``model.safetensors.index.json``. A collective: every rank calls it; each weight is gathered whole in turn and
    rank 0 appends it to its file, so no rank holds more than one whole tensor. A tied weight is written once."""
    path = Path(path)
    tensors = unique_tensors(model)
    sizes = {name: numel(t.shape) * t.element_size() for name, t in tensors.items()}
    files: list[list[str]] = [[]]
    for name in tensors:
        if files[-1] and sum(sizes[n] for n in files[-1]) + sizes[name] > max_shard_bytes:
            files.append([])
        files[-1].append(name)
    file_names = (["model.safetensors"] if len(files) == 1 else
                  [f"model-{i + 1:05d}-of-{len(files):05d}.safetensors" for i in range(len(files))])
    main = parallel.is_main
    try:
        if main:
            path.mkdir(parents=True, exist_ok=True)
        for file_name, names in zip(file_names, files):
            out = open(path / file_name, "wb") if main else None
            try:
                if main:
                    header, offset = {"__metadata__": {"format": "pt"}}, 0
                    for n in names:
                        t = tensors[n]
                        header[n] = {"dtype": safetensors_dtype(t.dtype, n), "shape": list(t.shape),
                                     "data_offsets": [offset, offset + sizes[n]]}
                        offset += sizes[n]
                    write_safetensors_header(out, header)
                for n in names:
                    t = tensors[n].detach()
                    full = parallel.collective(f"gathering {n} to write {path}", t.full_tensor) \
                        if is_sharded(t) else t
                    if main:
                        write_tensor(out, full)
                    del full
            finally:
                if out is not None:
                    out.close()
        if main:
            if len(files) > 1:
                weight_map = {n: f for f, names in zip(file_names, files) for n in names}
                (path / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, indent=2) + "\n")
            model.config.save_pretrained(path)
            if getattr(model, "generation_config", None) is not None and model.can_generate():
                model.generation_config.save_pretrained(path)
            if tokenizer is not None:
                tokenizer.save_pretrained(path)
    except OSError as e:
        raise CheckpointWriteError(f"{path}: cannot write the model: {write_failure_reason(e, path)}") from e
