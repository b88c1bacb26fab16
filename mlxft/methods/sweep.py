"""K-shot sweeps like TALLRec's Table 1: one run per (K, seed), each trained on K sampled rows and
scored on the same test split, then mean ± std of test AUC per K.

    mlxft sweep --recipe tallrec --shots 16,64,256 --seeds 0,1,2

The split is the recipe's (data.seed), so every run is scored on the same test rows; the seed
picks which K rows are drawn (data.k_shot_seed) and the training seed. A run is reused only when
its folder's name carries the hash of the very config it would run (never a stale result that
TALLRec's cache-by-seed-and-K can return); a run killed midway resumes from its checkpoint.

Writes into the sweep folder: one run folder per (K, seed), sweep.json, sweep.md and sweep.png.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from functools import partial
from pathlib import Path

import numpy as np

from mlxft.config import RunConfig, dump_config, load_config
from mlxft.errors import UserError
from mlxft.files import write_atomic
from mlxft.train.runs import Run

RESULT = "test.json"  # written last, atomically: its presence means the run is complete


def config_for(recipe: str, overrides: list[str], k: int, seed: int) -> RunConfig:
    return load_config(recipe, [*overrides, f"data.k_shot={k}", f"data.k_shot_seed={seed}", f"train.seed={seed}"])


def config_hash(config: RunConfig) -> str:
    return hashlib.sha256(dump_config(replace(config, out=None)).encode()).hexdigest()[:10]


def run_one(config: RunConfig, folder: Path, backend: str, echo) -> dict:
    """Train (or resume, or reuse) one run, then score its best weights on the test split."""
    if (folder / RESULT).exists():
        echo(f"{folder.name}: reused (same config)")
        return json.loads((folder / RESULT).read_text())
    from mlxft.eval.yes_no import score_yes_no
    from mlxft.methods import sft
    config.out = str(folder)
    if (folder / "checkpoint" / "state.json").exists():
        echo(f"{folder.name}: resuming")
        run = Run.open_for_resume(folder)
    else:
        if folder.exists():  # started but never checkpointed: nothing worth keeping
            import shutil

            shutil.rmtree(folder)
        echo(f"{folder.name}: training")
        run = Run.create(folder, config)
    try:
        summary = sft.train(config, run, backend=backend, resume=run.resumed, echo=lambda *a: None)
    except BaseException:
        run.reports.close(failed=True)
        raise
    finally:
        run.release()  # closes its report sinks (train.report_to) before the next run opens its own
    result = {"valid_before": summary["before"].get("eval_auc"), "valid_best": (summary["best"] or {}).get("value"),
              "steps": summary["steps"], **_test_auc(config, folder, partial(score_yes_no, backend))}
    write_atomic(folder / RESULT, json.dumps(result, indent=2))
    return result


def sweep(recipe: str, shots: list[int], seeds: list[int], overrides: list[str], out: Path, *,
          backend: str = "mlx", echo=print) -> dict:
    if not shots or not seeds:
        raise UserError("a sweep needs at least one K (--shots) and one seed (--seeds)")
    out = Path(out)
    runs = []
    for k in shots:
        for seed in seeds:
            config = config_for(recipe, overrides, k, seed)
            folder = out / f"k{k}-seed{seed}-{config_hash(config)}"
            runs.append({"k": k, "seed": seed, "folder": folder.name, **run_one(config, folder, backend, echo)})
    table = summarize(runs)
    report = {"recipe": recipe, "backend": backend, "overrides": list(overrides), "table": table, "runs": runs}
    write_atomic(out / "sweep.json", json.dumps(report, indent=2))
    write_atomic(out / "sweep.md", markdown(table, recipe))
    from mlxft.eval.plots import plot_sweep

    try:
        plot_sweep(table, out / "sweep.png")
    except UserError as e:  # the table is the result; the plot is a convenience
        echo(f"no plot: {e}")
    return report


def summarize(runs: list[dict]) -> list[dict]:
    """Mean ± std (over seeds, ddof 1 when there are several) of test AUC per K."""
    table = []
    for k in sorted({r["k"] for r in runs}):
        values = np.array([r["auc"] for r in runs if r["k"] == k], dtype=float)
        table.append({"k": k, "auc_mean": float(values.mean()),
                      "auc_std": float(values.std(ddof=1)) if len(values) > 1 else 0.0,
                      "seeds": len(values), "aucs": values.tolist()})
    return table


def markdown(table: list[dict], recipe: str) -> str:
    lines = [f"Test AUC of `{recipe}` by training rows K (mean ± std over seeds)", "",
             "| K | AUC | seeds | per seed |", "|---:|:---:|---:|---|"]
    for row in table:
        lines.append(f"| {row['k']} | {row['auc_mean']:.4f} ± {row['auc_std']:.4f} | {row['seeds']} | "
                     + ", ".join(f"{v:.4f}" for v in row["aucs"]) + " |")
    return "\n".join(lines) + "\n"


def _test_auc(config: RunConfig, folder: Path, score_yes_no) -> dict:
    from mlxft.data.dataset import load_splits

    splits = load_splits(config.data)
    if not splits.test:
        raise UserError(f"{config.data.source}: no test rows to score (data.split gives the test split none)")
    weights = folder / "best" if (folder / "best").exists() else folder / "last"
    # A LoRA run leaves an adapter; a full fine-tuning run a whole model folder.
    model, adapter = ((config.model.name, str(weights)) if (weights / "adapter_config.json").exists()
                      else (str(weights), None))
    report = score_yes_no(model, adapter, splits.test, template=splits.template, answers=list(config.eval.answers),
                          batch_size=config.eval.batch_size, trust_remote_code=config.model.trust_remote_code)
    return {"auc": report["auc"], "accuracy": report["accuracy"], "test_rows": report["rows"]}
