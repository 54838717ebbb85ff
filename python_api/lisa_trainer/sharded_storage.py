"""The files of a checkpoint written under torchrun: `torch.distributed.checkpoint` (DCP) plans, our own storage.

torch.distributed.checkpoint's own ``FileSystemWriter`` stores its ``.metadata`` with pickle (and any non-tensor
value as a pickled blob) and its reader unpickles them, so reading a checkpoint from someone else could run code.
Its ``HuggingFaceStorageWriter`` (safetensors files, no pickle) keeps each rank's whole file in memory until it is
written and is missing from older torch. So DCP is used here for what it is good at, the planning (which rank
writes which piece, which pieces a resume reads: ``create_read_items_for_chunk_list``, its resharding), through its
stable planner and storage interfaces, with a storage layer of our own: each rank streams its pieces into one
safetensors file (the header first, then one tensor at a time), and a JSON index says which file holds which piece
of which tensor. Reading uses ``json`` and ``safetensors`` only.

A `Piece` is one rank's part of one tensor of the checkpoint (its offsets in the whole tensor); the planners take a
flat dict of them, by name. The pieces, planners, writer and reader stay in one file (~470 lines) because they are
one contract: the writer's file layout, the index and what the reader and the load planner expect of them.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.distributed.checkpoint import StorageReader, StorageWriter
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

from .checkpoint import CheckpointError

SHARDED_FORMAT_VERSION = 2  # one-process checkpoints (trainer_state.pt) are format 1
INDEX_FILE = "index.json"

# safetensors' dtype names
_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
for _name, _st in (("float8_e4m3fn", "F8_E4M3"), ("float8_e5m2", "F8_E5M2"), ("uint16", "U16"), ("uint32", "U32"),
                   ("uint64", "U64")):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st
DTYPE_NAMES = {str(d).removeprefix("torch."): d for d in _ST_DTYPES}



def unique_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict, a tensor listed under several names (tied weights) under the first only."""
    seen, out = set(), {}
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out[name] = t
    return out



# --------------------------------------------------------------------------------------------- the pieces


def is_sharded(t) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def shard_layout(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(local shape, offset in the whole tensor) of this rank's shard of the DTensor `param`."""
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offset)


@dataclass
class Piece:
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
    def of(cls, value: torch.Tensor, like: torch.Tensor | None = None) -> Piece:
        """`value` (a tensor, or a DTensor), as `like`'s shard when `like` is a DTensor: sharded like it."""
        if is_sharded(value):
            like, value = value, value.to_local()
        if like is not None and is_sharded(like):
            shape, offsets = shard_layout(like)
            return cls(tuple(like.shape), offsets, value.detach(), dtype=value.dtype, local_shape=shape)
        return cls(tuple(value.shape), (0,) * value.dim(), value.detach(), dtype=value.dtype,
                   local_shape=tuple(value.shape))

    def materialize(self) -> torch.Tensor:
        return self.read() if self.read is not None else self.tensor


def _parked_piece(value, param: torch.Tensor) -> Piece:
    """A parked state tensor (`lisa_kernels.ParkedState`), read from the host bank only when it is written."""
    shape, dtype = value.bank.meta(value.name)
    shape = tuple(shape)
    if is_sharded(param):
        local, offsets = shard_layout(param)
        whole = tuple(param.shape)
    else:
        local, offsets, whole = shape, (0,) * len(shape), shape
    if shape != local:
        raise ValueError(f"parked state of shape {shape} for a parameter whose shard has shape {local}")
    return Piece(whole, offsets, read=value.read, dtype=dtype, local_shape=shape)


def state_piece(value, param: torch.Tensor, where: str) -> Piece:
    """An optimizer state tensor of `param`: sharded like it (moments) or whole (step counts, row-sparse rows)."""
    from lisa_kernels.state_parking import ParkedState

    if isinstance(value, ParkedState):
        try:
            return _parked_piece(value, param)
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from None
    if value.dim() == 0 or not is_sharded(param):
        return Piece.of(value)
    local, _ = shard_layout(param)
    if tuple(value.shape) != local:
        raise ValueError(f"{where}: state of shape {tuple(value.shape)} for a parameter whose shard has shape "
                         f"{local}: a sharded checkpoint holds state laid out like its parameter only")
    return Piece.of(value, like=param)


# ------------------------------------------------------------------------------------ DCP planners, storage


class PieceSavePlanner(SavePlanner):
    """A `torch.distributed.checkpoint` SavePlanner over a flat dict of `Piece`: each rank offers its pieces; a
    piece several ranks hold whole (same offsets) is written by one of them, the one with the fewest bytes so far."""

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False):
        self.pieces = state_dict

    def create_local_plan(self):
        items = []
        for fqn, piece in self.pieces.items():
            whole = torch.Size(piece.shape)
            if piece.shape != piece.local_shape and numel(piece.local_shape) == 0 and whole.numel() > 0:
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
            covered = sum(numel(c.sizes) for c in entry.chunks)
            if covered != entry.size.numel() and entry.size.numel() > 0:
                raise ValueError(f"{fqn}: the ranks' pieces cover {covered} of its {entry.size.numel()} elements")
        plans = [dataclasses.replace(plan, items=items) for plan, items in zip(all_plans, chosen)]
        return plans, Metadata(state_dict_metadata=tensors)

    def finish_plan(self, new_plan):
        return new_plan

    def resolve_data(self, write_item):
        return self.pieces[write_item.index.fqn].materialize()


class PieceLoadPlanner(LoadPlanner):
    """A `torch.distributed.checkpoint` LoadPlanner over a flat dict of `Piece`: DCP's resharding finds the saved
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


def numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _item_bytes(item) -> int:
    return numel(item.tensor_data.chunk.sizes) * _element_size(item.tensor_data.properties.dtype)


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.safetensors"


class ShardWriter(StorageWriter):
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
        return [dataclasses.replace(plan, storage_data=_rank_file(rank)) for rank, plan in enumerate(plans)]

    def write_data(self, plan, planner):
        name = plan.storage_data
        items = [item for item in plan.items]
        keys = [_piece_key(item.index.fqn, item.index.offset) for item in items]
        header, nbytes = {"__metadata__": {"format": "pt"}}, 0
        for key, item in zip(keys, items):
            data = item.tensor_data
            size = numel(data.chunk.sizes) * _element_size(data.properties.dtype)
            header[key] = {"dtype": safetensors_dtype(data.properties.dtype, item.index.fqn),
                           "shape": list(data.chunk.sizes), "data_offsets": [nbytes, nbytes + size]}
            nbytes += size
        results = []
        with open(self.folder / name, "wb") as f:
            write_safetensors_header(f, header)
            for key, item in zip(keys, items):
                tensor = planner.resolve_data(item)
                expected = tuple(item.tensor_data.chunk.sizes)
                if tuple(tensor.shape) != expected or tensor.dtype != item.tensor_data.properties.dtype:
                    raise ValueError(f"{item.index.fqn}: shape {tuple(tensor.shape)} ({tensor.dtype}) changed "
                                     f"while saving, planned {expected} ({item.tensor_data.properties.dtype})")
                write_tensor(f, tensor)
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


class ShardReader(StorageReader):
    """DCP StorageReader of `ShardWriter`'s files: the index with ``json``, the tensors with ``safetensors``."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.index = read_index(folder)

    def reset(self, checkpoint_id=None):
        pass

    def read_metadata(self, *args, **kwargs):
        tensors, storage = {}, {}
        for fqn, entry in self.index.items():
            chunks = [ChunkStorageMetadata(offsets=torch.Size(c["offsets"]), sizes=torch.Size(c["sizes"]))
                      for c in entry["chunks"]]
            tensors[fqn] = TensorStorageMetadata(properties=TensorProperties(dtype=DTYPE_NAMES[entry["dtype"]]),
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


def safetensors_dtype(dtype: torch.dtype, fqn: str) -> str:
    try:
        return _ST_DTYPES[dtype]
    except KeyError:
        raise ValueError(f"{fqn}: tensors of {dtype} cannot be checkpointed (safetensors has no such dtype)") from None


def write_safetensors_header(f, header: dict) -> None:
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    f.write(struct.pack("<Q", len(text)))
    f.write(text)


def write_tensor(f, tensor: torch.Tensor) -> None:
    """The tensor's bytes (little-endian, as safetensors stores them) from a host copy made here, if needed."""
    t = tensor.detach()
    if t.device.type != "cpu":
        t = t.to("cpu")
    t = t.contiguous().reshape(-1)
    if t.numel():
        f.write(memoryview(t.view(torch.uint8).numpy()))


def read_index(folder: Path) -> dict:
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
        if entry.get("dtype") not in DTYPE_NAMES:
            raise CheckpointError(f"{path}: {fqn!r} has an unknown dtype {entry.get('dtype')!r}")
    return index["tensors"]

