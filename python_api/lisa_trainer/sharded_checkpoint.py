"""Checkpoints of a run under torchrun: every rank writes its own shards at once, through torch.distributed.checkpoint.

Under ``torchrun`` (data-parallel or ``--fsdp``) a checkpoint folder ``checkpoint-<step>`` holds

- ``shards/rank-00000.safetensors``, ``rank-00001...``: the tensors each rank wrote: its shards of the weights,
  of the optimizer moments (those parked in its host state bank included, read from there one at a time, never
  brought to the GPU) and of the weights the open LISA period started from (for its update norms). A tensor every
  rank holds whole (data-parallel weights, step counts) is written once, by the rank with the fewest bytes so far;
- ``shards/index.json``: which file holds which piece of which tensor (offsets and sizes in the whole tensor);
- ``trainer_state.json``: the step and data position, the LISA controller's state (schedule, period log, gradient
  sums), the optimizer's parameter groups and which state each parameter has, the open period's first step;
- ``rng/rank-00000.json``...: each rank's RNG states;
- ``run.json``, ``config.json`` and the tokenizer, as a one-process checkpoint.

No rank ever holds the whole state: a rank's host memory grows by one tensor while it saves (the one being
written). A resume reads the pieces of each tensor that its own shard needs, so a checkpoint resumes under any
number of ranks, sharded or not, and in one process (FSDP and data-parallel runs do the same arithmetic, so a
resume under another layout continues to fp32 rounding; the same layout continues bit-identically).

Safety: torch.distributed.checkpoint's own ``FileSystemWriter`` stores its ``.metadata`` with pickle (and any
non-tensor value as a pickled blob) and its reader unpickles them, so reading a checkpoint from someone else could
run code. Its ``HuggingFaceStorageWriter`` (safetensors files, no pickle) keeps each rank's whole file in memory
until it is written (``safetensors.torch.save`` of all of a rank's tensors) and is missing from older torch. So DCP
is used here for what it is good at, the planning (which rank writes which piece, which pieces a resume reads:
``create_read_items_for_chunk_list``, its resharding), through its stable planner and storage interfaces, with a
storage layer of our own: each rank streams its tensors into a safetensors file (header first, then one tensor at
a time), the index is JSON, everything else is JSON too. Reading uses ``json`` and ``safetensors`` only: nothing in
a checkpoint is unpickled. The checkpoint is written under a temporary name and renamed by rank 0 once every rank
has written its part, so the newest ``checkpoint-<step>`` is always complete, also when a rank dies while saving.

Also here: the final model of an FSDP run written in Hugging Face format one gathered tensor at a time
(`save_sharded_model`), and what a checkpoint of one process (one file of whole tensors) needs to resume sharded
(`load_full_weights`, `shard_checkpoint_state`).
"""

from __future__ import annotations

import contextlib
import json
import os
import struct
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import StorageReader, StorageWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from .checkpoint import (
    RUN_FILE,
    SHARDED_STATE_FILE,
    CheckpointError,
    CheckpointWriteError,
    _fsync_dir,
    capture_rng_state,
    restore_rng_state,
    temporary_folder,
    write_failure_reason,
)

__all__ = ["is_sharded_checkpoint", "load_full_weights", "load_sharded_checkpoint", "read_full_tensors",
           "save_sharded_checkpoint", "save_sharded_model", "shard_checkpoint_state"]

SHARDED_FORMAT_VERSION = 2  # one-process checkpoints (trainer_state.pt) are format 1
SHARDS_DIR = "shards"
INDEX_FILE = "index.json"
RNG_DIR = "rng"
# transformers 4's max_shard_size ("5GB"; transformers 5 writes 50 GB files): a loader that reads the model file by
# file holds at most 5 GB of it at once (a 70B bf16 model: 28 files of 140 GB).
MAX_SHARD_BYTES = 5 * 10**9

# safetensors' dtype names
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
                   ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st
_DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in _ST_DTYPES}


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint written under torchrun (by every rank) rather than by one process."""
    return (Path(path) / SHARDED_STATE_FILE).is_file()


# --------------------------------------------------------------------------------------------- the pieces


def _is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _shard_layout(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, offset in the whole tensor) of this rank's shard of the DTensor `param`."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offset)


@dataclass
class _Piece:
    """This rank's piece of a tensor of the checkpoint: ``shape`` the whole tensor's, ``offsets`` where the piece
    starts in it. Saving: ``tensor`` is the piece (or ``read`` makes it, for parked state: when it is written, not
    before). Loading: ``tensor`` is where the piece is read into."""

    shape: tuple[int, ...]
    offsets: tuple[int, ...]
    tensor: torch.Tensor | None = None
    read: Callable[[], torch.Tensor] | None = None
    dtype: torch.dtype | None = None
    local_shape: tuple[int, ...] | None = None

    @classmethod
    def of(cls, value: torch.Tensor, like: torch.Tensor | None = None) -> _Piece:
        """`value` (a tensor, or a DTensor), as `like`'s shard when `like` is a DTensor: sharded like it."""
        if _is_sharded(value):
            like, value = value, value.to_local()
        if like is not None and _is_sharded(like):
            shape, offsets = _shard_layout(like)
            return cls(tuple(like.shape), offsets, value.detach(), dtype=value.dtype, local_shape=shape)
        return cls(tuple(value.shape), (0,) * value.dim(), value.detach(), dtype=value.dtype,
                   local_shape=tuple(value.shape))

    def materialize(self) -> torch.Tensor:
        return self.read() if self.read is not None else self.tensor


def _parked_piece(value, param: torch.Tensor) -> _Piece:
    """A parked state tensor (`lisa_kernels.ParkedState`), read from the host bank only when it is written."""
    shape, dtype = value.bank.meta(value.name)
    shape = tuple(shape)
    if _is_sharded(param):
        local, offsets = _shard_layout(param)
        whole = tuple(param.shape)
    else:
        local, offsets, whole = shape, (0,) * len(shape), shape
    if shape != local:
        raise ValueError(f"parked state of shape {shape} for a parameter whose shard has shape {local}")
    return _Piece(whole, offsets, read=value.read, dtype=dtype, local_shape=shape)


def _state_piece(value, param: torch.Tensor, where: str) -> _Piece:
    """An optimizer state tensor of `param`: sharded like it (moments) or whole (step counts, row-sparse rows)."""
    from lisa_kernels.state_parking import ParkedState

    if isinstance(value, ParkedState):
        try:
            return _parked_piece(value, param)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if value.dim() == 0 or not _is_sharded(param):
        return _Piece.of(value)
    local, _ = _shard_layout(param)
    if tuple(value.shape) != local:
        raise ValueError(f"{where}: state of shape {tuple(value.shape)} for a parameter whose shard has shape "
                         f"{local}: a sharded checkpoint holds state laid out like its parameter only")
    return _Piece.of(value, like=param)


# ------------------------------------------------------------------------------------ DCP planners, storage


class _SavePlanner(SavePlanner):
    """A `torch.distributed.checkpoint` SavePlanner over a flat dict of `_Piece`: each rank offers its pieces; a
    piece several ranks hold whole (same offsets) is written by one of them, the one with the fewest bytes so far."""

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.pieces = state_dict

    def create_local_plan(self):
        items = []
        for fqn, piece in self.pieces.items():
            whole = torch.Size(piece.shape)
            if piece.shape != piece.local_shape and _numel(piece.local_shape) == 0 and whole.numel() > 0:
                continue  # an empty shard (fewer rows than ranks): nothing to write
            items.append(WriteItem(
                index=MetadataIndex(fqn, piece.offsets),
                type=WriteItemType.SHARD if piece.shape != piece.local_shape else WriteItemType.TENSOR,
                tensor_data=TensorWriteData(
                    chunk=ChunkStorageMetadata(offsets=torch.Size(piece.offsets),
                                                  sizes=torch.Size(piece.local_shape)),
                    properties=TensorProperties(dtype=piece.dtype), size=whole)))
        return SavePlan(items)

    def create_global_plan(self, all_plans):
        import dataclasses

        holders: dict = {}
        for rank, plan in enumerate(all_plans):
            for item in plan.items:
                holders.setdefault(item.index, []).append((rank, item))
        written = [0] * len(all_plans)
        chosen: list[list] = [[] for _ in all_plans]
        for index, held in sorted(holders.items(), key=lambda kv: -_item_bytes(kv[1][0][1])):
            first = held[0][1].tensor_data
            for rank, item in held[1:]:
                if (item.tensor_data.size, item.tensor_data.chunk.sizes, item.tensor_data.properties.dtype) != \
                        (first.size, first.chunk.sizes, first.properties.dtype):
                    raise ValueError(f"{index.fqn}: rank {held[0][0]} holds shape {tuple(first.chunk.sizes)} "
                                     f"({first.properties.dtype}), rank {rank} {tuple(item.tensor_data.chunk.sizes)} "
                                     f"({item.tensor_data.properties.dtype}): the ranks' states differ")
            rank, item = min(held, key=lambda ri: (written[ri[0]], ri[0]))
            written[rank] += _item_bytes(item)
            chosen[rank].append(item)
        tensors: dict = {}
        for items in chosen:
            for item in items:
                data = item.tensor_data
                entry = tensors.setdefault(item.index.fqn, TensorStorageMetadata(
                    properties=data.properties, size=data.size, chunks=[]))
                if entry.size != data.size:
                    raise ValueError(f"{item.index.fqn}: the ranks disagree on its shape ({tuple(entry.size)} vs "
                                     f"{tuple(data.size)})")
                entry.chunks.append(data.chunk)
        for fqn, entry in tensors.items():
            covered = sum(_numel(c.sizes) for c in entry.chunks)
            if covered != entry.size.numel() and entry.size.numel() > 0:
                raise ValueError(f"{fqn}: the ranks' pieces cover {covered} of its {entry.size.numel()} elements")
        plans = [dataclasses.replace(plan, items=items) for plan, items in zip(all_plans, chosen)]
        return plans, Metadata(state_dict_metadata=tensors)

    def finish_plan(self, new_plan):
        return new_plan

    def resolve_data(self, write_item):
        return self.pieces[write_item.index.fqn].materialize()


class _LoadPlanner(LoadPlanner):
    """A `torch.distributed.checkpoint` LoadPlanner over a flat dict of `_Piece`: DCP's resharding finds the saved
    pieces that overlap each of ours; they are copied straight into our tensors."""

    def __init__(self, source: Path):
        self.source = source

    def set_up_planner(self, state_dict, metadata=None, is_coordinator=False):
        self.pieces, self.metadata = state_dict, metadata

    def create_local_plan(self):
        items = []
        for fqn, piece in self.pieces.items():
            saved = self.metadata.state_dict_metadata.get(fqn)
            if saved is None:
                raise KeyError(f"{self.source}: no tensor {fqn!r}")
            if tuple(saved.size) != piece.shape:
                raise ValueError(f"{self.source}: {fqn!r} has shape {tuple(saved.size)}, this run "
                                 f"{piece.shape}")
            chunk = ChunkStorageMetadata(offsets=torch.Size(piece.offsets), sizes=piece.tensor.shape)
            items += create_read_items_for_chunk_list(fqn, saved, [chunk])
        return LoadPlan(items)

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value):
        raise CheckpointError(f"{self.source}: {read_item.dest_index.fqn!r} is not a tensor")

    def resolve_tensor(self, read_item):
        t = self.pieces[read_item.dest_index.fqn].tensor
        for dim, (start, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths)):
            t = t.narrow(dim, start, length)
        return t

    def commit_tensor(self, read_item, tensor):
        pass  # read in place


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _item_bytes(item) -> int:
    return _numel(item.tensor_data.chunk.sizes) * _element_size(item.tensor_data.properties.dtype)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


class _ShardWriter(StorageWriter):
    """DCP StorageWriter: each rank streams its pieces into one safetensors file (the header, computed from the
    plan, then one tensor at a time: a rank holds at most one piece's host copy); the coordinator writes the JSON
    index once every rank has written."""

    def __init__(self, folder: Path):
        self.folder = folder

    def reset(self, checkpoint_id=None):
        pass

    def set_up_storage_writer(self, is_coordinator, *args, **kwargs):
        self.folder.mkdir(parents=True, exist_ok=True)

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        import dataclasses

        return [dataclasses.replace(plan, storage_data=_rank_file(rank)) for rank, plan in enumerate(plans)]

    def write_data(self, plan, planner):
        name = plan.storage_data
        items = [item for item in plan.items]
        keys = [_piece_key(item.index.fqn, item.index.offset) for item in items]
        header, nbytes = {"__metadata__": {"format": "pt"}}, 0
        for key, item in zip(keys, items):
            data = item.tensor_data
            size = _numel(data.chunk.sizes) * _element_size(data.properties.dtype)
            header[key] = {"dtype": _st_dtype(data.properties.dtype, item.index.fqn), "shape": list(data.chunk.sizes),
                           "data_offsets": [nbytes, nbytes + size]}
            nbytes += size
        results = []
        with open(self.folder / name, "wb") as f:
            _write_safetensors_header(f, header)
            for key, item in zip(keys, items):
                tensor = planner.resolve_data(item)
                expected = tuple(item.tensor_data.chunk.sizes)
                if tuple(tensor.shape) != expected or tensor.dtype != item.tensor_data.properties.dtype:
                    raise ValueError(f"{item.index.fqn}: shape {tuple(tensor.shape)} ({tensor.dtype}) changed "
                                     f"while saving, planned {expected} ({item.tensor_data.properties.dtype})")
                _write_tensor(f, tensor)
                del tensor  # a parked piece's host copy goes before the next is read
                results.append(WriteResult(index=item.index, size_in_bytes=header[key]["data_offsets"][1]
                                           - header[key]["data_offsets"][0], storage_data={"file": name, "key": key}))
            f.flush()
            os.fsync(f.fileno())
        done = Future()
        done.set_result(results)
        return done

    def finish(self, metadata, results):
        index = {}
        for rank_results in results:
            for r in rank_results:
                index.setdefault(r.index.fqn, []).append({"offsets": list(r.index.offset), **r.storage_data})
        tensors = {}
        for fqn, entry in metadata.state_dict_metadata.items():
            by_offset = {tuple(s["offsets"]): s for s in index.get(fqn, [])}
            tensors[fqn] = {
                "dtype": str(entry.properties.dtype).removeprefix("torch."), "shape": list(entry.size),
                "chunks": [{**by_offset[tuple(c.offsets)], "sizes": list(c.sizes)} for c in entry.chunks]}
        with open(self.folder / INDEX_FILE, "w") as f:
            json.dump({"format_version": SHARDED_FORMAT_VERSION, "tensors": tensors}, f)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True

    def storage_meta(self):
        return None


class _ShardReader(StorageReader):
    """DCP StorageReader of `_ShardWriter`'s files: the index with ``json``, the tensors with ``safetensors``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = _read_index(folder)

    def reset(self, checkpoint_id=None):
        pass

    def read_metadata(self, *args, **kwargs):
        tensors, storage = {}, {}
        for fqn, entry in self.index.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                      for c in entry["chunks"]]
            tensors[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=_DTYPE_NAMES[entry["dtype"]]),
                                                    size=torch.Size(entry["shape"]), chunks=chunks)
            for c in entry["chunks"]:
                storage[MetadataIndex(fqn, c["offsets"])] = (c["file"], c["key"], tuple(c["sizes"]))
        self.storage = storage
        return Metadata(state_dict_metadata=tensors, storage_data=storage)

    def set_up_storage_reader(self, metadata, is_coordinator, *args, **kwargs):
        self.storage = metadata.storage_data

    def prepare_local_plan(self, plan):
        return plan

    def prepare_global_plan(self, plans):
        return plans

    def read_data(self, plan, planner):
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list] = {}
        for item in plan.items:
            by_file.setdefault(self.storage[item.storage_index][0], []).append(item)
        for name, items in by_file.items():
            path = self.folder / name
            try:
                with safe_open(str(path), framework="pt") as f:
                    for item in items:
                        _, key, sizes = self.storage[item.storage_index]
                        if list(item.storage_offsets) == [0] * len(sizes) and tuple(item.lengths) == sizes:
                            tensor = f.get_tensor(key)
                        else:
                            tensor = f.get_slice(key)[tuple(slice(o, o + n) for o, n in
                                                            zip(item.storage_offsets, item.lengths))]
                        target = planner.resolve_tensor(item)
                        if tuple(tensor.shape) != tuple(target.shape):
                            raise CheckpointError(f"{path}: {key!r} has shape {tuple(tensor.shape)}, the index says "
                                                  f"{tuple(target.shape)}")
                        with torch.no_grad():
                            target.copy_(tensor)
                        planner.commit_tensor(item, target)
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{path}: damaged, truncated or missing ({e})") from e
        done = Future()
        done.set_result(None)
        return done

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return True


def _piece_key(fqn: str, offsets) -> str:
    """A piece's name in its rank's file: the tensor's name, and where the piece starts when not at 0."""
    return fqn if not any(offsets) else f"{fqn}@{','.join(map(str, offsets))}"


def _st_dtype(dtype: torch.dtype, fqn: str) -> str:
    try:
        return _ST_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"{fqn}: tensors of {dtype} cannot be checkpointed (safetensors has no such dtype)") from None


def _write_safetensors_header(f, header: dict) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    f.write(struct.pack("<Q", len(text)))
    f.write(text)


def _write_tensor(f, tensor: torch.Tensor) -> None:
    """The tensor's bytes (little-endian, as safetensors stores them) from a host copy made here, if needed."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    if t.numel():
        f.write(memoryview(t.view(torch.uint8).numpy()))


def _read_index(folder: Path) -> dict:
    path = folder / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint was not completely written)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged or truncated ({e})") from e
    if index.get("format_version") != SHARDED_FORMAT_VERSION:
        raise CheckpointError(f"{path}: index format {index.get('format_version')!r}, this version reads "
                              f"{SHARDED_FORMAT_VERSION}")
    for fqn, entry in index["tensors"].items():
        if entry.get("dtype") not in _DTYPE_NAMES:
            raise CheckpointError(f"{path}: {fqn!r} has an unknown dtype {entry.get('dtype')!r}")
    return index["tensors"]


# ------------------------------------------------------------------------------------------ plain values


def _to_json(x):
    """Tensors, tuples and plain values as JSON (tensors and tuples tagged, so they come back as they were)."""
    if isinstance(x, torch.Tensor):
        return {"__tensor__": str(x.dtype).removeprefix("torch."), "shape": list(x.shape),
                "data": x.detach().cpu().reshape(-1).tolist()}
    if isinstance(x, tuple):
        return {"__tuple__": [_to_json(v) for v in x]}
    if isinstance(x, list):
        return [_to_json(v) for v in x]
    if isinstance(x, dict):
        return {str(k): _to_json(v) for k, v in x.items()}
    if x is None or isinstance(x, (bool, int, float, str)):
        return x
    raise TypeError(f"cannot be checkpointed as JSON: a {type(x).__name__}")


def _from_json(x):
    if isinstance(x, dict):
        if "__tensor__" in x:
            dtype = _DTYPE_NAMES.get(x["__tensor__"])
            if dtype is None:
                raise ValueError(f"unknown tensor dtype {x['__tensor__']!r}")
            return torch.tensor(x["data"], dtype=dtype).reshape(x["shape"])
        if "__tuple__" in x:
            return tuple(_from_json(v) for v in x["__tuple__"])
        return {k: _from_json(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_from_json(v) for v in x]
    return x


def _write_json(path: Path, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f)
        f.flush()
        os.fsync(f.fileno())


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing (the checkpoint was not completely written)") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: damaged or truncated ({e})") from e


# ------------------------------------------------------------------------------------------------ saving


def _unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, a tensor listed under several names (tied weights) under the first only."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out


def _params_in_order(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _save_pieces(model: nn.Module, optimizer, controller) -> tuple[dict[str, _Piece], dict]:
    """This rank's pieces of every tensor of the checkpoint, and the JSON part of the optimizer state and period
    start (what is not a tensor, and which tensors each parameter's state has)."""
    from lisa_kernels.state_parking import ParkedState

    pieces = {f"model/{name}": _Piece.of(t) for name, t in _unique_tensors(model).items()}
    names = {id(p): n for n, p in model.named_parameters()}
    params = _params_in_order(optimizer)
    state = {}
    for p in params:
        entry = optimizer.state.get(p)
        if not entry:
            continue
        name = names[id(p)]
        plain = {}
        for key, value in entry.items():
            if isinstance(value, (torch.Tensor, ParkedState)):
                pieces[f"optimizer/{name}/{key}"] = _state_piece(value, p, f"optimizer state {key!r} of {name}")
                plain[key] = {"__piece__": True}
            else:
                plain[key] = _to_json(value)
        state[name] = plain
    groups = [{**{k: _to_json(v) for k, v in group.items() if k != "params"},
               "params": [names[id(p)] for p in group["params"]]} for group in optimizer.param_groups]
    period_start = controller.period_start_state()
    by_name = dict(model.named_parameters())
    if period_start is not None:
        for name, t in period_start["snapshots"].items():
            pieces[f"period_start/{name}"] = _Piece.of(t, like=by_name[name])
        period_start = {"period": period_start["period"], "first_step": period_start["first_step"],
                        "snapshots": list(period_start["snapshots"])}
    return pieces, {"optimizer": {"param_groups": groups, "state": state}, "period_start": period_start}


def save_sharded_checkpoint(path: str | Path, *, model: nn.Module, optimizer, controller, state: dict, parallel,
                            tokenizer=None, run_id: str = "") -> Path:
    """Write checkpoint ``path`` from every rank (a collective: every rank calls it; see the module docstring).
    ``parallel``: the run's `DataParallel`. Rank 0 renames the folder into place once every rank has written; if any
    rank fails, no ``path`` appears (earlier checkpoints are untouched) and every rank raises: the one that failed
    its own error (`CheckpointWriteError` for a failed write), the others `DistributedError` naming it."""
    path = Path(path)
    pieces, plain = _save_pieces(model, optimizer, controller)
    if not parallel.is_main:
        _write_shards(Path(parallel.broadcast_object(None)), path, pieces, parallel)
        parallel.barrier(f"writing {path}")  # rank 0 has renamed the folder into place (or failed)
        return path
    with temporary_folder(path) as tmp:
        parallel.broadcast_object(str(tmp))
        _write_shards(tmp, path, pieces, parallel)
        # Every rank's shards and the index are written: the rest is rank 0's.
        (tmp / RUN_FILE).write_text(json.dumps({"run_id": run_id, "step": state.get("step")}) + "\n")
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        _write_json(tmp / SHARDED_STATE_FILE, {
            "format_version": SHARDED_FORMAT_VERSION, "world_size": parallel.world_size, "fsdp": parallel.fsdp,
            "trainer": _to_json(state), "controller": _to_json(controller.state_dict()), **plain})
        _fsync_dir(tmp)
    parallel.barrier(f"writing {path}")
    return path


def _write_shards(tmp: Path, path: Path, pieces: dict[str, _Piece], parallel) -> None:
    """Every rank: its RNG states and its pieces (one DCP save, whose collectives end every rank's part)."""
    try:
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        _write_json(tmp / RNG_DIR / f"rank-{parallel.rank:05d}.json", _to_json(capture_rng_state()))
        dcp.save(pieces, storage_writer=_ShardWriter(tmp / SHARDS_DIR), planner=_SavePlanner())
    except BaseException as e:
        error = _unwrap(e, parallel.rank, f"rank {parallel.rank}: writing {path}")
        if isinstance(error, OSError) and not isinstance(error, CheckpointWriteError):
            error = CheckpointWriteError(f"{path}: cannot write the checkpoint: "
                                         f"{write_failure_reason(error, path.parent)}; earlier checkpoints are intact")
        raise parallel.explain_failure(error) from e


def _unwrap(error: BaseException, rank: int, what: str) -> BaseException:
    """A DCP call's failure as this rank reports it: DCP gathers every rank's exception into one
    `CheckpointException` raised on all of them; this rank's own exception when it failed itself, else a
    `DistributedError` quoting the ranks that failed."""
    from .distributed import DistributedError

    if not isinstance(error, CheckpointException):
        return error
    failures = {r: exc for r, (exc, _) in error.failures.items()}
    if rank in failures:
        return failures[rank]
    said = "; ".join(f"rank {r} failed: {''.join(traceback.format_exception_only(type(e), e)).strip()}"
                     for r, e in sorted(failures.items()))
    return DistributedError(f"{what} did not complete because {said}")


# ----------------------------------------------------------------------------------------------- loading


def _target(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor | None, sharded: bool) -> _Piece:
    """A host tensor to read a state tensor of whole shape `shape` into: this rank's shard of it when `sharded`
    (laid out like the DTensor `like`), else the whole tensor."""
    if sharded:
        local, offsets = _shard_layout(like)
        return _Piece(shape, offsets, torch.empty(local, dtype=dtype))
    return _Piece(shape, (0,) * len(shape), torch.empty(shape, dtype=dtype))


def read_full_tensors(path: str | Path, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """The whole tensors of a checkpoint written under torchrun whose names start with ``prefix`` (``model/``: the
    weights, ``optimizer/<param>/<key>``, ``period_start/``), by name without the prefix, in this process's memory
    (no process group needed): to inspect a checkpoint or convert it."""
    folder = Path(path) / SHARDS_DIR
    index = _read_index(folder)
    pieces = {fqn: _Piece(tuple(e["shape"]), (0,) * len(e["shape"]),
                          torch.empty(e["shape"], dtype=_DTYPE_NAMES[e["dtype"]]))
              for fqn, e in index.items() if fqn.startswith(prefix)}
    _dcp_load(pieces, folder, no_dist=True)
    return {fqn[len(prefix):]: piece.tensor for fqn, piece in pieces.items()}


def _dcp_load(pieces: dict[str, _Piece], folder: Path, no_dist: bool = False) -> None:
    with warnings.catch_warnings():  # one process: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(pieces, storage_reader=_ShardReader(folder), planner=_LoadPlanner(folder), no_dist=no_dist)


def load_sharded_checkpoint(path: str | Path, *, model: nn.Module, optimizer, controller, memory=None,
                            parallel=None) -> dict:
    """Restore a checkpoint written under torchrun (`save_sharded_checkpoint`) into this run, under any number of
    ranks (``parallel``: its `DataParallel`; a collective then) or in one process (None); returns the trainer's
    ``state`` dict. Each rank reads the pieces its shards need; the optimizer state is read into host memory and
    loaded as a one-process checkpoint is (frozen layers' state goes straight into the host bank with "park").
    ``memory``: the run's `lisa_trainer.memory.MemoryFeatures`, as for `lisa_trainer.checkpoint.load_checkpoint`."""
    from lisa_kernels import sparse_rows

    path = Path(path)
    saved = _read_json(path / SHARDED_STATE_FILE)
    if saved.get("format_version") != SHARDED_FORMAT_VERSION:
        raise CheckpointError(f"{path / SHARDED_STATE_FILE}: checkpoint format {saved.get('format_version')!r}, this "
                              f"version reads {SHARDED_FORMAT_VERSION} (and format 1, trainer_state.pt)")
    folder = path / SHARDS_DIR
    index = _read_index(folder)
    pieces = {}
    for name, t in _unique_tensors(model).items():
        pieces[f"model/{name}"] = _Piece.of(t)

    params = _params_in_order(optimizer)
    by_name = dict(model.named_parameters())
    names = {id(p): n for n, p in by_name.items()}
    saved_opt = saved["optimizer"]
    saved_names = [n for group in saved_opt["param_groups"] for n in group["params"]]
    if saved_names != [names[id(p)] for p in params]:
        mine = [names[id(p)] for p in params]
        first = next((i for i, (a, b) in enumerate(zip(saved_names, mine)) if a != b), min(len(saved_names), len(mine)))
        raise ValueError(f"{path / SHARDED_STATE_FILE}: the optimizer's parameters differ from this run's (at "
                         f"position {first}: {saved_names[first:first + 1]} vs {mine[first:first + 1]})")
    expand = {}  # name -> row-sparse state read whole, to be expanded and cut into this rank's shard
    for name, entry in saved_opt["state"].items():
        p = by_name[name]
        row_sparse = sparse_rows.ROWS in entry
        for key, value in entry.items():
            if value != {"__piece__": True}:
                continue
            fqn = f"optimizer/{name}/{key}"
            e = index[fqn]
            shape = tuple(e["shape"])
            sharded = _is_sharded(p) and shape == tuple(p.shape) and not row_sparse
            pieces[fqn] = _target(shape, _DTYPE_NAMES[e["dtype"]], p, sharded)
        if row_sparse and _is_sharded(p):
            expand[name] = p
    period_start = saved.get("period_start")
    for name in period_start["snapshots"] if period_start else ():
        e, p = index[f"period_start/{name}"], by_name[name]
        pieces[f"period_start/{name}"] = _target(tuple(e["shape"]), _DTYPE_NAMES[e["dtype"]], p, _is_sharded(p))

    rank = parallel.rank if parallel is not None else 0
    try:
        with torch.no_grad(), memory.weights_on_device() if memory is not None else contextlib.nullcontext():
            _dcp_load(pieces, folder, no_dist=parallel is None)
    except BaseException as e:
        error = _unwrap(e, rank, f"rank {rank}: reading {path}")
        if error is e:
            raise
        raise (parallel.explain_failure(error) if parallel is not None else error) from e

    state = {}
    for i, p in enumerate(params):
        name = names[id(p)]
        entry = saved_opt["state"].get(name)
        if entry is None:
            continue
        entry = {k: pieces[f"optimizer/{name}/{k}"].tensor if v == {"__piece__": True} else _from_json(v)
                 for k, v in entry.items()}
        state[i] = _shard_entry(entry, p) if name in expand else entry
    groups, start = [], 0
    for group, saved_group in zip(optimizer.param_groups, saved_opt["param_groups"]):
        n = len(saved_group["params"])
        g = {k: _from_json(v) for k, v in saved_group.items() if k != "params"}
        groups.append({**g, "params": list(range(start, start + n))})
        start += n
    if parallel is not None and parallel.fsdp:
        groups = _own_sparse_rows(optimizer, groups)
    if period_start is not None:
        period_start = {**period_start, "snapshots": {n: pieces[f"period_start/{n}"].tensor
                                                      for n in period_start["snapshots"]}}

    controller.load_state_dict(_from_json(saved["controller"]))
    controller.load_period_start_state(period_start)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
    if memory is not None:
        memory.after_checkpoint_load()
    rng = path / RNG_DIR / f"rank-{rank:05d}.json"
    restore_rng_state(_from_json(_read_json(rng if rng.is_file() else path / RNG_DIR / "rank-00000.json")))
    return _from_json(saved["trainer"])


# ------------------------------------------------------------------ one-process checkpoints, resumed sharded


def _local_shard(full, like: torch.Tensor):
    """This rank's shard of the whole tensor `full`, cut as the DTensor `like` is, where `full` is (a checkpoint's
    CPU tensor stays on the CPU: `distribute_tensor` would first copy all of it to the GPU); a copy, so the whole
    tensor can go. Scalars and tensors of unsharded parameters as they are. No communication."""
    if not (_is_sharded(like) and isinstance(full, torch.Tensor) and full.dim() > 0):
        return full
    shape, offset = _shard_layout(like)
    piece = full.detach()
    for dim, (size, start) in enumerate(zip(shape, offset)):
        piece = piece.narrow(dim, start, size)
    return piece.clone()


def _shard_entry(entry: dict, param: torch.Tensor) -> dict:
    """One parameter's optimizer state of whole tensors, cut to this rank's shard of the DTensor `param`.

    An input embedding's row-sparse state (`lisa_kernels.sparse_rows`: moments of the rows that have had a gradient
    only) has no shards: it is expanded to the dense moments it stands for (zeros in the other rows; its one step
    count is the parameter's, as in dense AdamW, so the rows without state are exactly rows whose moments stayed
    zero)."""
    from lisa_kernels import sparse_rows

    if sparse_rows.ROWS in entry:
        entry = dict(entry)
        sparse_rows.expand(entry, torch.empty(param.shape, dtype=torch.bool))  # the full shape, CPU
    return {k: _local_shard(v, param) for k, v in entry.items()}


def _own_sparse_rows(optimizer, saved_groups: list[dict]) -> list[dict]:
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
            if _is_sharded(t):
                t.to_local().copy_(_local_shard(full, t))
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
    state = {i: _shard_entry(entry, param_of[i]) for i, entry in payload["optimizer"]["state"].items()}
    period_start = payload.get("period_start")
    if period_start is not None:
        by_name = dict(model.named_parameters())
        period_start = {**period_start, "snapshots": {name: _local_shard(t, by_name[name]) for name, t
                                                      in period_start["snapshots"].items()}}
    return {**payload, "optimizer": {**payload["optimizer"], "param_groups": _own_sparse_rows(optimizer, saved_groups),
                                     "state": state}, "period_start": period_start}


# ------------------------------------------------------------------------------------------ the final model


def save_sharded_model(model: nn.Module, path: str | Path, parallel, tokenizer=None,
                       max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
    """Write an FSDP model in Hugging Face format (``from_pretrained`` loads it): ``model.safetensors``, or
    ``model-0000i-of-0000n.safetensors`` files of at most ``max_shard_bytes`` each plus
    ``model.safetensors.index.json``. A collective: every rank calls it; each weight is gathered whole in turn and
    rank 0 appends it to its file, so no rank holds more than one whole tensor. A tied weight is written once."""
    path = Path(path)
    tensors = _unique_tensors(model)
    sizes = {name: _numel(t.shape) * t.element_size() for name, t in tensors.items()}
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
                        header[n] = {"dtype": _st_dtype(t.dtype, n), "shape": list(t.shape),
                                     "data_offsets": [offset, offset + sizes[n]]}
                        offset += sizes[n]
                    _write_safetensors_header(out, header)
                for n in names:
                    t = tensors[n].detach()
                    full = parallel.collective(f"gathering {n} to write {path}", t.full_tensor) \
                        if _is_sharded(t) else t
                    if main:
                        _write_tensor(out, full)
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
