"""One PNG summarising a LISA run from its JSONL log: loss, which layers were active when, update norms per period."""

from __future__ import annotations

import math
from pathlib import Path

from .runlog import read_log


def _row_order(names: set[str]) -> list[str]:
    """Decoder layers by index first, then named modules (embeddings, head, norm) alphabetically."""
    layers = sorted((n for n in names if n.lstrip("-").isdigit()), key=int)
    return layers + sorted(n for n in names if not n.lstrip("-").isdigit())


def plot_run(log_path: str | Path, png_path: str | Path, *, title: str | None = None) -> Path:
    """Write the three-panel figure for the run logged at ``log_path``; returns ``png_path``."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import numpy as np
    from matplotlib.ticker import MaxNLocator

    records = read_log(log_path)
    config = next((r for r in records if r["kind"] == "config"), {})
    steps = [r for r in records if r["kind"] == "step"]
    evals = [r for r in records if r["kind"] == "eval"]
    periods = [r for r in records if r["kind"] == "period"]
    n_layers = config.get("n_layers") or 1 + max((i for r in steps for i in r["active_layers"]), default=0)
    max_step = max([r["step"] for r in steps] + [config.get("max_steps", 0) or 0, 1])

    fig, (ax_loss, ax_act, ax_norm) = plt.subplots(3, 1, figsize=(10, 11), gridspec_kw={"height_ratios": [3, 2, 2.5]})
    fig.suptitle(title or "LISA fine-tuning run")

    # Loss: train per step, held-out at each evaluation.
    ax_loss.plot([r["step"] for r in steps], [r["loss"] for r in steps], lw=1, label="train loss")
    if evals:
        ax_loss.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", ms=4, label="held-out loss")
    ax_loss.set_xlabel("optimizer step")
    ax_loss.set_ylabel("loss (nats/token)")
    ax_loss.set_xlim(0, max_step)
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()

    # Active layers: a raster, layer x step, dark where the layer was trainable.
    active = np.zeros((n_layers, max_step))
    for r in steps:
        for i in r["active_layers"]:
            if 0 <= i < n_layers:
                active[i, r["step"] - 1] = 1
    ax_act.imshow(active, aspect="auto", interpolation="nearest", cmap="Greys", origin="lower", extent=(0, max_step, -0.5, n_layers - 0.5), vmin=0, vmax=1)
    ax_act.set_ylabel("decoder layer")
    ax_act.set_xlabel("optimizer step")
    ax_act.set_yticks(range(n_layers))
    ax_act.set_title("active (trainable) decoder layers; embeddings, head and final norm always train", fontsize=9)

    # Update norms: module x period, log scale, blank where a module did not train in that period.
    norms = [p.get("update_norms", {}) for p in periods]
    names = _row_order({str(k) for n in norms for k in n})
    if names and norms:
        grid = np.full((len(names), len(norms)), np.nan)
        for j, n in enumerate(norms):
            for k, v in n.items():
                if v is not None and v > 0:
                    grid[names.index(str(k)), j] = math.log10(v)
        im = ax_norm.imshow(grid, aspect="auto", interpolation="nearest", cmap="viridis", origin="lower")
        fig.colorbar(im, ax=ax_norm, label="log10 ||W_end - W_start||")
        ax_norm.set_yticks(range(len(names)))
        ax_norm.set_yticklabels(names, fontsize=7 if len(names) > 16 else 9)
        ax_norm.set_xlabel("LISA period")
        ax_norm.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax_norm.set_title("weight-update norm per period; blank: not trained in that period", fontsize=9)
    else:
        ax_norm.text(0.5, 0.5, "no finished LISA period logged", ha="center", va="center", transform=ax_norm.transAxes)
        ax_norm.set_axis_off()

    fig.tight_layout()
    png_path = Path(png_path)
    png_path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path
