"""The run log, ``<output_dir>/train_log.jsonl``: one JSON object per line, each with a ``"kind"``.

- ``config``: the run's settings; ``step``: loss, lr, grad norm, active layers, tokens/s, memory;
- ``period``: a finished LISA period: its layers and each layer's weight-update norm (from the controller);
- ``eval``: held-out loss; ``summary``: first/last loss, wall time, peak memory.

Reading a log (for plots, or for ``--lisa_layer_weights``) needs nothing but this module.
"""

from __future__ import annotations

import json
from pathlib import Path

LOG_FILE = "train_log.jsonl"


class JsonlLog:
    """Append-only JSONL; on resume, records after the checkpoint's step are dropped so history is not doubled.
    ``is_new``: the log starts empty (a new run, or a resume without its log). ``also``: more sinks for each record
    (``log(record)``, ``close()``: the ``--report_to`` trackers)."""

    def __init__(self, path: Path, *, resume_step: int | None, also=()):
        self.path, self.also = path, list(also)
        path.parent.mkdir(parents=True, exist_ok=True)
        self.is_new = resume_step is None or not path.exists()
        if self.is_new:
            path.write_text("")
        else:
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the crash we are resuming from
                if rec.get("step", 0) <= resume_step and rec.get("kind") != "summary":
                    kept.append(line)
            path.write_text("".join(k + "\n" for k in kept))
        self._fh = open(path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()
        for sink in self.also:
            sink.log(record)

    def close(self) -> None:
        self._fh.close()
        for sink in self.also:
            sink.close()


def read_log(path: str | Path) -> list[dict]:
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


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
