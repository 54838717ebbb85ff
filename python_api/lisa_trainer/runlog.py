"""The run log, ``<output_dir>/train_log.jsonl``: one JSON object per line, each with a ``"kind"``.

- ``config``: the run's settings; ``step``: loss, lr, grad norm, active layers, tokens/s, memory;
- ``period``: a finished LISA period: its layers and each layer's weight-update norm (from the controller);
- ``eval``: held-out loss; ``summary``: first/last loss, wall time, peak memory.

Reading a log (for plots, or for ``--lisa_layer_weights``) needs nothing but this module. A last line cut short
(a kill or a full disk while a record was appended) is left out with a warning; a damaged line elsewhere is an error
naming the file and line.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import NoReturn

LOG_FILE = "train_log.jsonl"


class LogWriteError(OSError):
    """The run log could not be written (disk full, file-size limit, no permission); the message names it and why."""


class JsonlLog:
    """Append-only JSONL. ``is_new``: the log starts empty (a new run, or a resume without its log). ``also``: more
    sinks for each record (``log(record)``, ``close()``: the ``--report_to`` trackers).

    On resume (``resume_step``: the checkpoint's step) the records the checkpoint had not seen are dropped, so the
    history is not doubled: those of later steps, the summary, and period records past the checkpoint's first
    ``resume_periods`` (a finished run logs its last, partial period after the checkpoint of its last step). The
    log is rewritten atomically (a temporary file, then a rename): a crash meanwhile leaves the old log whole.
    """

    def __init__(self, path: Path, *, resume_step: int | None, resume_periods: int | None = None, also=()):
        self.path, self.also = path, list(also)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.is_new = resume_step is None or not path.exists()
        kept, periods = [], 0
        for line, record in [] if self.is_new else _read_lines(path):
            if record.get("kind") == "period":
                periods += 1
                if resume_periods is not None and periods > resume_periods:
                    continue
            if record.get("step", 0) <= resume_step and record.get("kind") != "summary":
                kept.append(line)
        tmp = path.with_name(f".{path.name}.tmp")  # one run per folder (its lock): a fixed name is safe
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.writelines(line + "\n" for line in kept)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            self._raise_write_error(e)
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        try:
            self._fh.write(json.dumps(record) + "\n")
            self._fh.flush()
        except OSError as e:
            try:
                self._fh.close()  # tries the flush once more; the file is closed either way
            except OSError:
                pass
            self._raise_write_error(e)
        for sink in self.also:
            sink.log(record)

    def _raise_write_error(self, error: OSError) -> NoReturn:
        from .checkpoint import write_failure_reason  # here: reading a log needs no torch

        reason = write_failure_reason(error, self.path.parent)
        raise LogWriteError(f"{self.path}: cannot write the run log: {reason}") from error

    def close(self) -> None:
        self._fh.close()
        for sink in self.also:
            sink.close()


def read_log(path: str | Path, *, warn: bool = True) -> list[dict]:
    """The records of a run log. A last line that is not a JSON record is what a crash while appending leaves: it
    is left out (with a warning naming it, unless ``warn=False``). A damaged line elsewhere raises ValueError."""
    return [record for _, record in _read_lines(Path(path), warn=warn)]


def _read_lines(path: Path, *, warn: bool = True) -> list[tuple[str, dict]]:
    """(line, record) for each record of the log at ``path``; see `read_log`."""
    lines = [(n, line) for n, line in enumerate(path.read_text(errors="replace").splitlines(), 1) if line.strip()]
    out = []
    for n, line in lines:
        try:
            record = json.loads(line)
            problem = None if isinstance(record, dict) else f"a JSON {type(record).__name__}, not an object"
        except json.JSONDecodeError as e:
            problem = f"{e.msg}: column {e.colno}"
        if problem is None:
            out.append((line, record))
        elif n < lines[-1][0]:
            raise ValueError(f"{path}, line {n}: not a JSON record ({problem})")
        elif warn:
            warnings.warn(f"{path}, line {n}: cut short (the run stopped while writing it); left out", stacklevel=3)
    return out


def period_record(entry: dict, step: int) -> dict:
    """A controller period-log entry as a JSON-safe log record.

    ``update_norms`` joins the controller's per-layer list and per-module dict into one mapping
    (``"3"`` -> norm of decoder layer 3, ``"model.embed_tokens"`` -> norm of the embeddings) for plotting and for
    turning into ``--lisa_layer_weights``.
    """
    rec = {"kind": "period", "step": step}
    for k, v in entry.items():
        rec[k] = _jsonable(v)
    norms = {str(i): n for i, n in zip(entry.get("layers", ()), entry.get("layer_update_norms") or ())}
    norms.update({str(k): v for k, v in (entry.get("module_update_norms") or {}).items()})
    if norms:
        rec["update_norms"] = _jsonable(norms)
    return rec


def _jsonable(v):
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "tolist"):  # a tensor or numpy value: a number (0-d) or a nested list
        return v.tolist()
    return v


class NullLog:
    """The run log of ranks other than 0: rank 0 writes the one log of a data-parallel run."""

    is_new = False  # nothing is written here, a config record neither

    def write(self, record: dict) -> None:
        pass

    def close(self) -> None:
        pass


def summary_record(records: list[dict], *, step: int, **figures) -> dict:
    """The ``summary`` record of a run whose log holds `records`, at optimizer step `step`: first and last losses,
    skipped steps, the periods' layers, this process's peak host memory, and `figures` (tokens seen, wall time, ...)."""
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    periods = [r for r in records if r["kind"] == "period"]
    return {
        "kind": "summary",
        "step": step,
        "steps": step,
        "skipped_steps": sum(1 for r in steps if r.get("skipped")),
        "first_loss": steps[0]["loss"] if steps else None,
        "last_loss": steps[-1]["loss"] if steps else None,
        "first_eval_loss": evals[0]["eval_loss"] if evals else None,
        "last_eval_loss": evals[-1]["eval_loss"] if evals else None,
        "periods": [{"period": p["period"], "layers": p["layers"]} for p in periods],
        **figures,
        "peak_host_rss_mb": peak_host_rss_mb(),
    }


def peak_host_rss_bytes() -> int | None:
    """This process's peak resident host memory so far, in bytes (`getrusage`'s ru_maxrss, which Linux gives in
    KiB and macOS in bytes); None where there is no `resource` module (Windows)."""
    try:
        import resource
    except ImportError:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss if sys.platform == "darwin" else rss * 1024


def peak_host_rss_mb() -> float | None:
    """`peak_host_rss_bytes` in MiB, as the run summary reports it."""
    rss = peak_host_rss_bytes()
    return None if rss is None else rss / 2**20

