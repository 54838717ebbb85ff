"""Checkpoints that resume a LISA run exactly, written atomically and read back without unpickling code.

This module writes the checkpoints of a run in one process; under torchrun every rank writes its own part
(`lisa_trainer.sharded_checkpoint`, the same folder name and run id, its state in ``trainer_state.json``). Both
resume under any number of ranks. A one-process checkpoint is a folder ``checkpoint-<step>``:

- ``model.safetensors`` + ``config.json`` (+ tokenizer files): the weights, loadable by ``from_pretrained`` too;
- ``run.json``: the id of the run that wrote it, so a run resumes and prunes only its own checkpoints;
- ``trainer_state.pt``: optimizer state (``optimizer.state_dict()``, which includes state parked in host memory),
  LISA controller/sampler state (with the weights the current period started from, for its update norms), lr
  schedule, RNG states, step and trainer counters. Only tensors and plain Python containers go in, so it is read
  with ``torch.load(weights_only=True)``: a checkpoint from someone else cannot run code on your machine.

The folder is first written under a temporary name next to its destination and then renamed, so an interrupted
save never leaves a half-written ``checkpoint-<step>`` behind that a resume would pick up. A save that fails (disk
full, file-size limit) removes its temporary folder and raises :class:`CheckpointWriteError`, saying why; the
temporary folder of a killed save is removed by the next run in that folder.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

import torch

from .distributed import DistributedError

CHECKPOINT_PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.pt"
SHARDED_STATE_FILE = "trainer_state.json"  # a checkpoint written under torchrun, by every rank (sharded_checkpoint.py)
MODEL_FILE = "model.safetensors"
RUN_FILE = "run.json"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint this run cannot resume from: another model or LISA schedule, a damaged or unsafe file."""


class CheckpointWriteError(OSError):
    """A checkpoint or model could not be written (disk full, file-size limit, no permission); nothing half-written
    is left behind and earlier checkpoints are untouched."""


def capture_rng_state() -> dict:
    """torch CPU/CUDA, python and (if importable) numpy RNG states as tensors and plain containers."""
    state = {"torch": torch.get_rng_state(), "python": _to_plain(random.getstate())}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy as np
    except ImportError:
        pass
    else:
        kind, keys, pos, has_gauss, cached = np.random.get_state()
        state["numpy"] = [kind, torch.from_numpy(keys.astype("int64")), int(pos), int(has_gauss), float(cached)]
    return state


def restore_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(_to_tuple(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        try:
            import numpy as np
        except ImportError:
            return
        kind, keys, pos, has_gauss, cached = state["numpy"]
        np.random.set_state((kind, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _to_plain(x):
    return [_to_plain(v) for v in x] if isinstance(x, tuple) else x


def _to_tuple(x):
    return tuple(_to_tuple(v) for v in x) if isinstance(x, list) else x


def checkpoint_dir(output_dir: str | Path, step: int) -> Path:
    return Path(output_dir) / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_run_id(path: str | Path) -> str:
    """The id of the run that wrote the checkpoint at ``path``; "" for one written before checkpoints had ids."""
    try:
        return str(json.loads((Path(path) / RUN_FILE).read_text())["run_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def list_checkpoints(output_dir: str | Path, run_id: str | None = None) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first (temporary folders are ignored); with ``run_id``, only
    that run's."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = []
    for p in out.iterdir():
        m = re.fullmatch(rf"{CHECKPOINT_PREFIX}(\d+)", p.name)
        complete = (p / STATE_FILE).is_file() or (p / SHARDED_STATE_FILE).is_file()
        if m and complete and (run_id is None or checkpoint_run_id(p) == run_id):
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def latest_checkpoint(output_dir: str | Path, run_id: str | None = None) -> Path | None:
    found = list_checkpoints(output_dir, run_id)
    return found[-1] if found else None


def remove_stale_temp_folders(output_dir: str | Path) -> list[Path]:
    """Clear what saves killed half-way left (only of processes that are gone); returns the folders removed.

    ``.checkpoint-N.tmp-PID`` is a checkpoint never finished: deleted. ``.checkpoint-N.old-PID`` is a complete
    checkpoint a re-save of step N was replacing: deleted if the new ``checkpoint-N`` made it, else put back.
    """
    removed = []
    out = Path(output_dir)
    for p in out.iterdir() if out.is_dir() else ():
        m = re.fullmatch(rf"\.({CHECKPOINT_PREFIX}\d+)\.(tmp|old)-(\d+)", p.name)
        if not m or not p.is_dir() or _process_alive(int(m.group(3))):
            continue
        if m.group(2) == "old" and not (out / m.group(1)).exists():
            os.replace(p, out / m.group(1))
        else:
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return False  # this process has not started a save yet: the folder is an earlier process's with our pid
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def save_checkpoint(path: str | Path, *, model, optimizer, controller, state: dict, tokenizer=None,
                    run_id: str = "") -> Path:
    """Write a checkpoint folder of one process atomically; ``state`` holds the trainer's own plain counters and
    settings."""
    from safetensors.torch import save_model

    with temporary_folder(path) as tmp:
        (tmp / RUN_FILE).write_text(json.dumps({"run_id": run_id, "step": state.get("step")}) + "\n")
        save_model(model, str(tmp / MODEL_FILE), metadata={"format": "pt"})  # shared (tied) tensors stored once
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        payload = {
            "format_version": FORMAT_VERSION,
            "optimizer": optimizer.state_dict(),
            "controller": controller.state_dict(),
            "period_start": controller.period_start_state(),
            "rng": capture_rng_state(),
            "trainer": state,
        }
        torch.save(payload, tmp / STATE_FILE)
        fsync_dir(tmp)
    return Path(path)


@contextmanager
def temporary_folder(path: str | Path):
    """Yield a new temporary folder next to ``path``, renamed to ``path`` when the block ends (replacing a folder
    there), removed when it raises: a write failure (disk full, file-size limit) as `CheckpointWriteError`."""
    from safetensors import SafetensorError

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir()
        yield tmp
        if path.exists():  # re-saving the same step: swap the new folder in, then delete the old one
            old = path.parent / f".{path.name}.old-{os.getpid()}"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
        fsync_dir(path.parent)
    except (CheckpointWriteError, DistributedError):  # said already (another rank's failure: by that rank)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except (OSError, RuntimeError, SafetensorError) as e:  # torch.save and safetensors: a full disk is no OSError
        reason = write_failure_reason(e, path.parent)
        shutil.rmtree(tmp, ignore_errors=True)
        raise CheckpointWriteError(f"{path}: cannot write the checkpoint: {reason}; earlier checkpoints are intact") from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_failure_reason(exc: BaseException, folder: Path) -> str:
    """Why writing into ``folder`` failed (``exc`` still in hand, its partial files not yet removed), in words: full disk, file-size limit, permissions, or the error itself.

    torch.save reports a full disk only as "unexpected pos 576 vs 534" and safetensors as "os error 28", so the
    errno is looked for in the text too, and the free space and file-size limit are checked when there is none.
    """
    code = getattr(exc, "errno", None)
    found = re.search(r"os error (\d+)", str(exc))
    code = code or (int(found.group(1)) if found else None)
    limit = _file_size_limit()
    if code is None:  # no errno to go by: look at the disk and the limit
        try:  # a write just failed: under 1 MiB left on its disk is the likely reason
            disk_full = shutil.disk_usage(folder).free < 1 << 20
        except OSError:
            disk_full = False
        code = errno.ENOSPC if disk_full else errno.EFBIG if limit is not None else None
    if code in (errno.ENOSPC, errno.EDQUOT):
        return f"no space left on the device of {folder}"
    if code == errno.EFBIG:
        return f"a file would exceed the file-size limit (ulimit -f) of {limit} bytes" if limit else "file too large"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"{folder} is not writable ({os.strerror(code)})"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _file_size_limit() -> int | None:
    try:
        import resource
    except ImportError:  # not on Windows
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else soft


def fsync_dir(path: Path) -> None:
    for f in path.iterdir() if path.is_dir() else []:
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def read_checkpoint_state(path: str | Path, map_location="cpu") -> dict:
    """The ``trainer_state.pt`` payload, read with ``weights_only=True``."""
    path = Path(path)
    state_file = path / STATE_FILE
    if not state_file.is_file():
        raise FileNotFoundError(f"{path}: not a checkpoint (no {STATE_FILE})")
    try:
        payload = torch.load(state_file, map_location=map_location, weights_only=True)
    except RuntimeError as e:  # a cut-short file: "PytorchStreamReader failed reading zip archive: ...", then advice
        reason = str(e).strip().splitlines()[0].split(". ")[0]
        raise CheckpointError(f"{state_file}: damaged or truncated ({reason})") from e
    if payload.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: checkpoint format {payload.get('format_version')} is not {FORMAT_VERSION}")
    return payload


def load_checkpoint(path: str | Path, *, model, optimizer, controller, memory=None, sharded: bool = False) -> dict:
    """Restore model, optimizer, controller and RNG states in place; returns the trainer's ``state`` dict.
    ``memory``: the run's `lisa_trainer.memory.MemoryFeatures`, whose hooks bring offloaded weights back for the load
    and choose the embedding's gradient for the loaded optimizer state. ``sharded``: the model is sharded by FSDP:
    each rank cuts the checkpoint's whole tensors to its own shards (a checkpoint of one process holds no shards, so
    it resumes under any number of ranks).

    Order matters: weights, then the controller (which re-enters the saved period and so knows which layers are
    frozen), then the optimizer. With the "park" policy the optimizer has a `lisa_kernels.StateParker` (whatever
    ``--optim``), whose ``load_state_dict`` hook sends the frozen layers' saved state straight into the host state
    bank (its ``park_on_load``, "frozen" by default): the full optimizer state never sits on the GPU at once.
    """
    from safetensors.torch import load_file, load_model

    path = Path(path)
    payload = read_checkpoint_state(path)
    with memory.weights_on_device() if memory is not None else contextlib.nullcontext():
        if not sharded:
            device = next(model.parameters()).device
            load_model(model, str(path / MODEL_FILE), strict=True, device=str(device))
        else:
            from .fsdp_weights import load_full_weights, shard_checkpoint_state

            load_full_weights(model, load_file(str(path / MODEL_FILE)), str(path / MODEL_FILE))
            payload = shard_checkpoint_state(payload, model, optimizer)
    controller.load_state_dict(payload["controller"])
    controller.load_period_start_state(payload.get("period_start"))
    optimizer.load_state_dict(payload["optimizer"])
    if memory is not None:
        memory.after_checkpoint_load()
    restore_rng_state(payload["rng"])
    return payload["trainer"]


def prune_checkpoints(output_dir: str | Path, keep: int | None, run_id: str | None = None) -> None:
    """Delete all but the newest ``keep`` checkpoints (of run ``run_id`` only, when given; ``None`` keeps all)."""
    if keep is None:
        return
    found = list_checkpoints(output_dir, run_id)
    for p in found[: max(0, len(found) - keep)]:
        shutil.rmtree(p, ignore_errors=True)
