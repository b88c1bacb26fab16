"""bench.png: processed tokens/s and share of the peak GEMM rate per backend, and each backend's
step times (warm-up steps marked), so a slow first step or a noisy neighbour shows at a glance."""

from __future__ import annotations

from pathlib import Path

from mlxft.eval.plots import _pyplot


def plot_bench(report: dict, out: Path) -> Path:
    plt = _pyplot()
    rows = [row for row in report["rows"] if row["available"]]
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    names = [row["backend"] for row in rows]
    tokens, supervised = axes[0], axes[1]
    tokens.bar(names, [row["tokens_per_second"] for row in rows], color="tab:blue")
    tokens.set_title("processed tokens/s (non-padding)")
    supervised.bar(names, [100 * (row["peak_share"] or 0) for row in rows], color="tab:orange")
    supervised.set_title("% of peak GEMM rate")
    for ax in (tokens, supervised):
        ax.grid(axis="y", alpha=0.3)
    steps = axes[2]
    for backend in names:
        records = report["results"][backend]["steps"]
        steps.plot([s["step"] for s in records], [s["seconds"] for s in records], marker="o", label=backend)
        warm = [s for s in records if not s["timed"]]
        if warm:
            steps.scatter([s["step"] for s in warm], [s["seconds"] for s in warm], color="grey", zorder=3)
    steps.set_title("step time (s); grey: warm-up, not timed")
    steps.set_xlabel("step")
    steps.xaxis.get_major_locator().set_params(integer=True)
    steps.grid(alpha=0.3)
    if names:
        steps.legend()
    for row in report["rows"]:
        if not row["available"]:
            tokens.text(0.02, 0.95, f"{row['backend']}: not available", transform=tokens.transAxes, va="top", fontsize=8)
    figure.suptitle(f"mlxft bench {report['workload']}: {Path(report['model']).name}, batch {report['batch_size']}, "
                    f"{report['threads']} threads")
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    plt.close(figure)
    return Path(out)
