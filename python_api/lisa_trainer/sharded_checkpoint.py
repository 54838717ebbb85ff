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

Nothing in a checkpoint is unpickled: DCP plans which rank writes and reads which piece, and the files are
`lisa_trainer.sharded_storage`'s (safetensors and JSON). The checkpoint is written under a temporary name and renamed
by rank 0 once every rank has written its part, so the newest ``checkpoint-<step>`` is always complete, also when a
rank dies while saving. A one-process checkpoint resumed under FSDP and the final FSDP model:
`lisa_trainer.fsdp_weights`.
"""


from __future__ import annotations

import contextlib
import json
import os
import traceback
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.api import CheckpointException

from .checkpoint import (
    RUN_FILE,
    SHARDED_STATE_FILE,
    CheckpointError,
    CheckpointWriteError,
    capture_rng_state,
    fsync_dir,
    restore_rng_state,
    temporary_folder,
    write_failure_reason,
)
from .fsdp_weights import own_sparse_rows, shard_entry
from .sharded_storage import (
    DTYPE_NAMES,
    SHARDED_FORMAT_VERSION,
    Piece,
    PieceLoadPlanner,
    PieceSavePlanner,
    ShardReader,
    ShardWriter,
    is_sharded,
    read_index,
    shard_layout,
    state_piece,
    unique_tensors,
)

__all__ = ["is_sharded_checkpoint", "load_sharded_checkpoint", "read_full_tensors", "save_sharded_checkpoint"]

SHARDS_DIR = "shards"
RNG_DIR = "rng"


def is_sharded_checkpoint(path: str | Path) -> bool:
    """Whether ``path`` is a checkpoint written under torchrun (by every rank) rather than by one process."""
    return (Path(path) / SHARDED_STATE_FILE).is_file()


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
            dtype = DTYPE_NAMES.get(x["__tensor__"])
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


def _params_in_order(optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _save_pieces(model: nn.Module, optimizer, controller) -> tuple[dict[str, Piece], dict]:
    """This rank's pieces of every tensor of the checkpoint, and the JSON part of the optimizer state and period
    start (what is not a tensor, and which tensors each parameter's state has)."""
    from lisa_kernels.state_parking import ParkedState

    pieces = {f"model/{name}": Piece.of(t) for name, t in unique_tensors(model).items()}
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
                pieces[f"optimizer/{name}/{key}"] = state_piece(value, p, f"optimizer state {key!r} of {name}")
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
            pieces[f"period_start/{name}"] = Piece.of(t, like=by_name[name])
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
        fsync_dir(tmp)
    parallel.barrier(f"writing {path}")
    return path


def _write_shards(tmp: Path, path: Path, pieces: dict[str, Piece], parallel) -> None:
    """Every rank: its RNG states and its pieces (one DCP save, whose collectives end every rank's part)."""
    try:
        (tmp / RNG_DIR).mkdir(exist_ok=True)
        _write_json(tmp / RNG_DIR / f"rank-{parallel.rank:05d}.json", _to_json(capture_rng_state()))
        dcp.save(pieces, storage_writer=ShardWriter(tmp / SHARDS_DIR), planner=PieceSavePlanner())
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


def _target(shape: tuple[int, ...], dtype: torch.dtype, like: torch.Tensor | None, sharded: bool) -> Piece:
    """A host tensor to read a state tensor of whole shape `shape` into: this rank's shard of it when `sharded`
    (laid out like the DTensor `like`), else the whole tensor."""
    if sharded:
        local, offsets = shard_layout(like)
        return Piece(shape, offsets, torch.empty(local, dtype=dtype))
    return Piece(shape, (0,) * len(shape), torch.empty(shape, dtype=dtype))


def read_full_tensors(path: str | Path, prefix: str = "model/") -> dict[str, torch.Tensor]:
    """The whole tensors of a checkpoint written under torchrun whose names start with ``prefix`` (``model/``: the
    weights, ``optimizer/<param>/<key>``, ``period_start/``), by name without the prefix, in this process's memory
    (no process group needed): to inspect a checkpoint or convert it."""
    folder = Path(path) / SHARDS_DIR
    index = read_index(folder)
    pieces = {fqn: Piece(tuple(e["shape"]), (0,) * len(e["shape"]),
                          torch.empty(e["shape"], dtype=DTYPE_NAMES[e["dtype"]]))
              for fqn, e in index.items() if fqn.startswith(prefix)}
    _dcp_load(pieces, folder, no_dist=True)
    return {fqn[len(prefix):]: piece.tensor for fqn, piece in pieces.items()}


def _dcp_load(pieces: dict[str, Piece], folder: Path, no_dist: bool = False) -> None:
    with warnings.catch_warnings():  # one process: DCP warns that it assumes so
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(pieces, storage_reader=ShardReader(folder), planner=PieceLoadPlanner(folder), no_dist=no_dist)


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
    index = read_index(folder)
    pieces = {}
    for name, t in unique_tensors(model).items():
        pieces[f"model/{name}"] = Piece.of(t)

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
            sharded = is_sharded(p) and shape == tuple(p.shape) and not row_sparse
            pieces[fqn] = _target(shape, DTYPE_NAMES[e["dtype"]], p, sharded)
        if row_sparse and is_sharded(p):
            expand[name] = p
    period_start = saved.get("period_start")
    for name in period_start["snapshots"] if period_start else ():
        e, p = index[f"period_start/{name}"], by_name[name]
        pieces[f"period_start/{name}"] = _target(tuple(e["shape"]), DTYPE_NAMES[e["dtype"]], p, is_sharded(p))

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
        state[i] = shard_entry(entry, p) if name in expand else entry
    groups, start = [], 0
    for group, saved_group in zip(optimizer.param_groups, saved_opt["param_groups"]):
        n = len(saved_group["params"])
        g = {k: _from_json(v) for k, v in saved_group.items() if k != "params"}
        groups.append({**g, "params": list(range(start, start + n))})
        start += n
    if parallel is not None and parallel.fsdp:
        groups = own_sparse_rows(optimizer, groups)
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


