"""One small harness for every benchmark in this folder.

- `time_fn(fn, warmup, repeats)`: median / p20 / p80 in milliseconds. CUDA events around each call on a GPU
  (host timers would only measure the launch), `time.perf_counter` on CPU.
- `measure_copy_bandwidth(device)`: what a plain device-to-device copy achieves in the same run, counting read +
  write, so kernel figures can be quoted as a fraction of it rather than of a datasheet peak.
- `environment(device)`: device name, library versions, git commit and UTC date, stored with every result.
- `write_results(name, payload)`: `<results folder>/<name>-<device-slug>.json`; the folder is `results_dir`
  when given, else `$LISA_BENCH_RESULTS`, else `benchmarks/results/`.
- `print_table(rows)`: a plain-text table.

Importing this module touches no GPU. Benchmarks run from the repository root as modules
(`python -m benchmarks.bench_x`) and import it as `from benchmarks.common import time_fn, write_results, ...`.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import subprocess
import time
from importlib import metadata
from pathlib import Path
from typing import Callable, Iterable, Sequence

import torch

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"
RESULTS_ENV = "LISA_BENCH_RESULTS"  # where every benchmark (and gpu_suite.sh) writes, when set


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def synchronize(device: torch.device | str | None = None) -> None:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def percentile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (q in [0, 100]), the same rule as numpy's default."""
    if not values:
        raise ValueError("percentile of an empty sequence")
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def summarize(times_ms: Sequence[float]) -> dict:
    """Median with p20/p80: the spread without letting one slow outlier move the headline figure."""
    return {
        "median_ms": percentile(times_ms, 50),
        "p20_ms": percentile(times_ms, 20),
        "p80_ms": percentile(times_ms, 80),
        "repeats": len(times_ms),
    }


class Timer:
    """Times one region: CUDA events on a GPU, perf_counter on CPU. `elapsed_ms()` synchronizes."""

    def __init__(self, device: torch.device | str | None = None):
        self.device = torch.device(device) if device is not None else default_device()
        self._cuda = self.device.type == "cuda"

    def __enter__(self):
        if self._cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        else:
            self._t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self._cuda:
            self._end.record()
        else:
            self._t1 = time.perf_counter()
        return False

    def elapsed_ms(self) -> float:
        if self._cuda:
            self._end.synchronize()
            return self._start.elapsed_time(self._end)
        return (self._t1 - self._t0) * 1e3


def time_fn(fn: Callable[[], object], warmup: int = 3, repeats: int = 10,
            device: torch.device | str | None = None) -> dict:
    """Call `fn` `warmup` times untimed, then `repeats` times timed one by one; return `summarize` of the times."""
    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    device = torch.device(device) if device is not None else default_device()
    for _ in range(warmup):
        fn()
    synchronize(device)
    timers = []
    for _ in range(repeats):
        with Timer(device) as t:
            fn()
        timers.append(t)
    synchronize(device)
    return summarize([t.elapsed_ms() for t in timers])


def measure_copy_bandwidth(device: torch.device | str | None = None, nbytes: int | None = None,
                           warmup: int = 3, repeats: int = 10) -> dict:
    """GB/s of `dst.copy_(src)` on one device, counting bytes read + bytes written (2 x nbytes).

    Defaults to 1 GiB on a GPU (far larger than L2, so it measures HBM) and 64 MiB on CPU (a memcpy)."""
    device = torch.device(device) if device is not None else default_device()
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (64 << 20)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=warmup, repeats=repeats, device=device)
    del src, dst
    return {"gbps": 2 * nbytes / (t["median_ms"] * 1e-3) / 1e9, "bytes": nbytes, **t}


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def device_name(device: torch.device | str | None = None) -> str:
    device = torch.device(device) if device is not None else default_device()
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "meta":  # tensors without data: accounting of allocations, no hardware involved
        return "meta"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return "CPU " + line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "CPU " + (platform.processor() or platform.machine())


def device_slug(device: torch.device | str | None = None) -> str:
    """'nvidia-h100-80gb-hbm3' for a GPU, 'cpu' for any CPU (one CPU file per benchmark, not one per model),
    'meta' for the meta device."""
    device = torch.device(device) if device is not None else default_device()
    if device.type == "meta":
        return "meta"
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device_name(device).lower()).strip("-")


def environment(device: torch.device | str | None = None) -> dict:
    device = torch.device(device) if device is not None else default_device()
    status = _git("status", "--porcelain", "--untracked-files=no")
    env = {
        "device": device_name(device),
        "device_type": device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": _version("triton"),
        "transformers": _version("transformers"),
        "peft": _version("peft"),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": None if status is None else bool(status),
        "date_utc": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu_memory_bytes"] = props.total_memory
    return env


def results_folder(results_dir: Path | str | None = None) -> Path:
    """`results_dir` when given, else `$LISA_BENCH_RESULTS` when set, else benchmarks/results/."""
    if results_dir is None:
        results_dir = os.environ.get(RESULTS_ENV) or RESULTS_DIR
    return Path(results_dir).expanduser()


def results_path(name: str, device: torch.device | str | None = None, suffix: str = ".json",
                 results_dir: Path | str | None = None) -> Path:
    folder = results_folder(results_dir)
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{name}-{device_slug(device)}{suffix}"


def write_results(name: str, payload: dict, device: torch.device | str | None = None,
                  results_dir: Path | str | None = None) -> Path:
    """Write `payload` (plus an `environment` entry unless it has one) as JSON into `results_folder(results_dir)`."""
    payload = dict(payload)
    payload.setdefault("environment", environment(device))
    path = results_path(name, device, results_dir=results_dir)
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    return path


def save_results(name: str, payload: dict, device, results_dir: Path | str | None = None, chart=None) -> Path:
    """Write the JSON (`write_results`) and print where; `chart(png_path)`, when given, draws the chart beside it
    (skipped with a line saying why when matplotlib is missing)."""
    path = write_results(name, payload, device, results_dir=results_dir)
    print(f"results: {path}")
    if chart is not None:
        png = results_path(name, device, ".png", results_dir=results_dir)
        try:
            chart(png)
        except ImportError as exc:
            print(f"chart skipped: {exc}")
        else:
            print(f"chart:   {png}")
    return path


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == 0 or 1e-3 <= abs(value) < 1e5:
            return f"{value:.4g}" if abs(value) < 10 else f"{value:.1f}"
        return f"{value:.3e}"
    return str(value)


def format_table(rows: Iterable[dict], columns: Sequence[str] | None = None, title: str | None = None) -> str:
    rows = list(rows)
    if columns is None:
        columns = []
        for row in rows:
            columns += [k for k in row if k not in columns]
    cells = [[_cell(row.get(c)) for c in columns] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    lines = [] if title is None else [title]
    lines.append("  ".join(c.ljust(w) for c, w in zip(columns, widths)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        # Left-align text, right-align numbers.
        lines.append("  ".join(v.rjust(w) if re.fullmatch(r"[-+0-9.e]+", v) and v != "-" else v.ljust(w)
                               for v, w in zip(r, widths)))
    return "\n".join(lines)


def print_table(rows: Iterable[dict], columns: Sequence[str] | None = None, title: str | None = None) -> None:
    print(format_table(rows, columns, title), flush=True)
