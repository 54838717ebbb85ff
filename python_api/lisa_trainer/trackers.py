"""Experiment trackers (``--report_to``): the run's log records, also sent to TensorBoard or Weights & Biases.

``train_log.jsonl`` stays the complete record; a tracker gets the numbers of each record (loss, learning rate,
gradient norm, tokens/s, memory, held-out loss) under ``<kind>/<field>`` names at the record's step. A tracker whose
package is not installed is left out with one warning naming the package, and training goes on.
"""

from __future__ import annotations

import importlib.util
import math
import numbers
import os
import warnings
from pathlib import Path

TRACKERS = {"tensorboard": "tensorboard", "wandb": "wandb"}  # name -> the package it needs


def parse_report_to(value) -> list[str]:
    """``none``, ``all``, one name, or several (a list, or separated by commas or spaces) -> tracker names."""
    names = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    if not names or names == ["none"]:
        return []
    if names == ["all"]:
        return list(TRACKERS)
    unknown = [n for n in names if n not in TRACKERS]
    if unknown:
        raise ValueError(f"unknown tracker(s) {', '.join(unknown)}; use none, all or any of "
                         f"{', '.join(TRACKERS)}")
    return list(dict.fromkeys(names))


def _scalars(record: dict) -> dict[str, float]:
    kind = record.get("kind", "log")
    return {f"{kind}/{key}": float(value) for key, value in record.items()
            if key not in ("kind", "step") and isinstance(value, numbers.Real) and not isinstance(value, bool)
            and math.isfinite(value)}


class _TensorBoard:
    def __init__(self, output_dir: Path, run_name: str, config: dict):
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(output_dir / "runs" / run_name))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in sorted(config.items())))

    def log(self, values: dict, step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, output_dir: Path, run_name: str, config: dict):
        import wandb

        # WANDB_PROJECT and WANDB_MODE (e.g. offline) are read as with transformers' integration.
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "lisa-kernels"), name=run_name,
                              dir=str(output_dir), config=config)

    def log(self, values: dict, step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


_OPENERS = {"tensorboard": _TensorBoard, "wandb": _WandB}


class Trackers:
    """The trackers of one run; ``log(record)`` takes the same dicts as ``train_log.jsonl``."""

    def __init__(self, names: list[str], output_dir: str | Path, run_name: str | None = None, config: dict | None = None):
        output_dir = Path(output_dir)
        run_name = run_name or output_dir.name
        self.open = []
        for name in names:
            package = TRACKERS[name]
            if importlib.util.find_spec(package) is None:
                warnings.warn(f"--report_to {name}: the '{package}' package is not installed (pip install {package}); "
                              "training goes on without it", stacklevel=2)
                continue
            self.open.append(_OPENERS[name](output_dir, run_name, dict(config or {})))

    def log(self, record: dict) -> None:
        values = _scalars(record)
        if values:
            for tracker in self.open:
                tracker.log(values, int(record.get("step", 0)))

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []
