"""The output folder of a training run: one run at a time, and each run touches only its own files.

- An exclusive OS file lock (``flock`` on ``.lisa_run.lock``) is held for the life of the run: a second run in the
  same folder stops at once, naming the first run's pid. The OS drops the lock when the process ends, however it
  ends, so a killed run leaves nothing that blocks the next one.
- Every run has an id, written in its log's ``config`` record and in each of its checkpoints (``run.json``). A new
  run refuses a folder holding another run's log or checkpoints, and a resumed run one holding another run's log,
  unless told to overwrite; ``latest`` is the newest checkpoint of the run whose log is in the folder, and pruning
  touches only the current run's checkpoints.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .checkpoint import checkpoint_run_id, list_checkpoints, remove_stale_temp_folders
from .runlog import LOG_FILE, read_log

LOCK_FILE = ".lisa_run.lock"


class RunFolderError(RuntimeError):
    """The output folder cannot take this run: not writable, in use by another run, or holding another run's files."""


@dataclass(frozen=True)
class RunClaim:
    run_id: str
    resume_from: Path | None  # the checkpoint to resume ("latest" resolved), None for a new run


@contextlib.contextmanager
def claim_output_dir(output_dir: str | Path, *, resume_from: str | Path | None = None, overwrite: bool = False) -> Iterator[RunClaim]:
    """Hold ``output_dir`` for one run: check it is writable, lock it, clear leftovers of killed saves, and decide
    the run's id (a new one, or the resumed checkpoint's). Raises :class:`RunFolderError`, or ``FileNotFoundError``
    when ``resume_from="latest"`` finds no checkpoint of the folder's run."""
    folder = Path(output_dir)
    ensure_writable_folder(folder)
    with _exclusive_lock(folder):
        remove_stale_temp_folders(folder)
        yield _resolve_run(folder, resume_from, overwrite)


def ensure_writable_folder(folder: Path) -> None:
    """Create ``folder`` if needed and check a file can be made in it."""
    existing = next(p for p in (folder, *folder.absolute().parents) if p.exists())
    if not existing.is_dir():
        raise RunFolderError(f"{folder}: cannot create it: {existing} is a file" if existing != folder
                             else f"{folder}: exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        raise RunFolderError(f"{folder}: not writable ({e.strerror or e})") from None


def current_run_id(folder: Path) -> str | None:
    """The run whose log is in ``folder``; without a log, the one run its checkpoints belong to (None: no run, or
    checkpoints of several runs and no log to tell which is current)."""
    logged = log_run_id(folder)
    if logged is not None:
        return logged
    ids = {checkpoint_run_id(p) for p in list_checkpoints(folder)}
    return ids.pop() if len(ids) == 1 else None


def log_run_id(folder: Path) -> str | None:
    """The id of the run logged in ``folder`` ("" for a log from before runs had ids), None without a log. A cut last
    line is what a crash leaves: the run that resumes this log drops it and says so."""
    path = folder / LOG_FILE
    try:
        records = read_log(path, warn=False) if path.is_file() else []
    except ValueError:  # a log damaged elsewhere still belongs to some run
        return ""
    if not records:
        return None
    config = next((r for r in records if r.get("kind") == "config"), {})
    return config.get("run_id", "")  # "" for a log written before runs had ids


def _resolve_run(folder: Path, resume_from, overwrite: bool) -> RunClaim:
    if resume_from is None:
        run_id, checkpoint = uuid.uuid4().hex[:12], None
    elif str(resume_from) == "latest":
        run_id = current_run_id(folder)
        if run_id is None and list_checkpoints(folder):
            raise FileNotFoundError(f"{folder}: checkpoints of several runs and no {LOG_FILE} to tell which run to "
                                    f"continue; name a checkpoint-N folder")
        checkpoint = (list_checkpoints(folder, run_id) or [None])[-1] if run_id is not None else None
        if checkpoint is None:
            raise FileNotFoundError(f"{folder}: no checkpoint-* folder of the run logged there to resume from")
    else:
        checkpoint = Path(resume_from)
        run_id = checkpoint_run_id(checkpoint)
    if overwrite:
        return RunClaim(run_id, checkpoint)
    logged = log_run_id(folder)
    if checkpoint is not None and logged not in (None, run_id):
        raise RunFolderError(
            f"{folder / LOG_FILE} is another run's log than {checkpoint}'s, and resuming would replace it: resume in "
            f"another output folder, or pass --overwrite_output_dir"
        )
    others = [p.name for p in list_checkpoints(folder) if checkpoint_run_id(p) != run_id]
    if logged not in (None, run_id):
        others.insert(0, LOG_FILE)
    if checkpoint is None and others:  # a resumed run leaves older runs' checkpoints alone; a new one is refused
        shown = ", ".join(others[:4]) + (f" and {len(others) - 4} more" if len(others) > 4 else "")
        raise RunFolderError(
            f"{folder} holds another run's files ({shown}): continue that run with --resume_from_checkpoint latest, "
            f"start a new one there with --overwrite_output_dir, or choose another output folder"
        )
    return RunClaim(run_id, checkpoint)


@contextlib.contextmanager
def _exclusive_lock(folder: Path) -> Iterator[None]:
    key = folder.resolve()
    try:
        import fcntl
    except ImportError:  # Windows: no flock; one run per folder is then up to the user
        yield
        return
    fh = open(key / LOCK_FILE, "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = fh.read().strip() or "?"
        fh.close()
        raise RunFolderError(f"{folder}: another run (pid {holder}) is using this output folder; wait for it to end "
                             f"or choose another output folder") from None
    except OSError as e:  # a filesystem without locks (some network mounts): run, but say it is unguarded
        fh.close()
        warnings.warn(f"{folder}: cannot lock it ({e.strerror}); nothing stops a second run from using it too", stacklevel=3)
        yield
        return
    fh.seek(0)
    fh.truncate()
    fh.write(f"{os.getpid()}\n")
    fh.flush()
    try:
        yield
    finally:
        fh.close()  # releases the lock
