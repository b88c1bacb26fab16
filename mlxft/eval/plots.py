"""PNG plots of what people would rather see than read: a run's curves, a sweep's AUC against K.

    mlxft plot runs/tallrec-20261121-2130          # writes runs/.../metrics.png

matplotlib is an extra (`pip install "mlxft[plot]"`); without it the commands say so in one line.
"""

from __future__ import annotations

import json
from pathlib import Path

from mlxft.errors import UserError


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise UserError('plots need matplotlib: pip install "mlxft[plot]"') from None
    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    return plt


def read_metrics(run_folder: Path) -> list[dict]:
    path = Path(run_folder) / "metrics.jsonl"
    if not path.exists():
        raise UserError(f"{run_folder}: no metrics.jsonl (not a run folder, or nothing logged yet)")
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    if not records:
        raise UserError(f"{path}: empty; the run has not reported a step yet")
    return records


def run_panels(records: list[dict]) -> dict[str, list[tuple[str, list, list]]]:
    """Panel title -> curves (label, steps, values): training and validation loss share a panel;
    every other eval_ metric, the learning rate and tokens/s get their own."""
    def curve(key):
        points = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in points], [p[1] for p in points]

    panels = {"loss": [("train", *curve("loss"))]}
    if any("eval_loss" in r for r in records):
        panels["loss"].append(("validation", *curve("eval_loss")))
    skip = {"eval_loss", "eval_tokens", "eval_rows", "eval_positive_rate"}  # counts and label balance: not curves
    for key in dict.fromkeys(k for r in records for k in r if k.startswith("eval_") and k not in skip):
        panels[key.removeprefix("eval_")] = [("validation", *curve(key))]
    for key in ("learning_rate", "tokens_per_second"):
        if any(key in r for r in records):
            panels[key.replace("_", " ")] = [("train", *curve(key))]
    return panels


def plot_run(run_folder: Path, out: Path | None = None) -> Path:
    """One PNG with a panel per metric against the step; returns its path."""
    plt = _pyplot()
    panels = run_panels(read_metrics(run_folder))
    columns = min(3, len(panels))
    rows = -(-len(panels) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.2 * rows), squeeze=False)
    for ax, (title, curves) in zip(axes.flat, panels.items()):
        for label, steps, values in curves:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title == "loss" and all(v > 0 for _, _, values in curves for v in values):
            ax.set_yscale("log")  # the first steps' loss would flatten everything after them
        ax.grid(alpha=0.3)
        if len(curves) > 1:
            ax.legend()
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    figure.suptitle(Path(run_folder).name)
    figure.tight_layout()
    out = Path(out) if out else Path(run_folder) / "metrics.png"
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return out


def plot_sweep(table: list[dict], out: Path, metric: str = "auc") -> Path:
    """Mean ± std of `metric` against K (log scale), one point per K, as in TALLRec's Table 1."""
    plt = _pyplot()
    figure, ax = plt.subplots(figsize=(5, 3.5))
    shots = [row["k"] for row in table]
    ax.errorbar(shots, [row[f"{metric}_mean"] for row in table], yerr=[row[f"{metric}_std"] for row in table],
                marker="o", capsize=4)
    ax.set_xscale("log", base=2)
    ax.set_xticks(shots, [str(k) for k in shots])
    ax.set_xlabel("training rows (K)")
    ax.set_ylabel(f"test {metric} (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return Path(out)
