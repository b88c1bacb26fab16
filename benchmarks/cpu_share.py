"""The README's main command on MLX beside a busy neighbour: fixed compute threads against
mlxft's adaptive ones (mlxft.cpu_share), on this machine's cores.

    python benchmarks/cpu_share.py                  # 3 settings x (alone, beside a spinner, two runs at once)
    python benchmarks/cpu_share.py --steps 120 --settings auto,1

Each setting runs `mlxft lora --recipe tallrec --backend mlx` (the built-in model, bundled MIND
sample, a short run: --steps training steps, no evaluation in between) three ways:
- alone;
- beside one process that spins on one core (`python -c "while True: pass"`), the simplest
  neighbour: a build, a test run, a browser tab;
- two identical runs started together, each the other's neighbour (two experiments at once, or
  the ranks of `--nproc 2` on one machine);
and reports trained tokens/s over the whole training (adaptation included: auto needs two windows
of two seconds to see a neighbour). Settings: a number N fixes the threads (MLXFT_CPU_THREADS=N);
auto lets mlxft choose them between steps (the default). Nothing else should run meanwhile;
the machine's load before each run is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def run_command(out: Path, steps: int) -> list[str]:
    return [sys.executable, "-m", "mlxft", "lora", "--recipe", "tallrec", "--backend", "mlx", "--out", str(out),
            "--set", f"train.steps={steps}", "--set", "eval.every=0", "--set", "train.report_every=10",
            "--set", "data.max_valid_rows=16", "--set", "train.checkpoint_every=100000"]


def tokens_per_second(out: Path) -> float:
    """Trained tokens over the training time, from the reports (each report's window: tokens / rate)."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    seconds, previous = 0.0, 0
    for record in records:
        seconds += (record["trained_tokens"] - previous) / record["tokens_per_second"]
        previous = record["trained_tokens"]
    return previous / seconds


def start(out: Path, steps: int, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(run_command(out, steps), env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, out: Path) -> float:
    if process.wait() != 0:
        sys.exit(f"run {out} failed; see its log next to it")
    return tokens_per_second(out)


def environment(setting: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in common.THREAD_VARIABLES}  # auto: nothing fixed
    env["MLXFT_CPU_THREADS"] = setting
    return env


def measure(setting: str, steps: int, work: Path) -> dict:
    env = environment(setting)
    result = {}
    print(f"[{setting}] load before: {os.getloadavg()[0]:.2f}", flush=True)
    result["alone"] = finish(start(work / f"{setting}-alone", steps, env, work / f"{setting}-alone.log"), work / f"{setting}-alone")
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        result["beside_a_spinner"] = finish(start(work / f"{setting}-busy", steps, env, work / f"{setting}-busy.log"),
                                            work / f"{setting}-busy")
    finally:
        spinner.kill()
        spinner.wait()
    time.sleep(2)
    pair = [start(work / f"{setting}-pair-{i}", steps, env, work / f"{setting}-pair-{i}.log") for i in (0, 1)]
    result["two_at_once_each"] = [finish(p, work / f"{setting}-pair-{i}") for i, p in enumerate(pair)]
    print(f"[{setting}] " + json.dumps(result), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=80, help="training steps per run (default 80)")
    parser.add_argument("--settings", default=f"{len(os.sched_getaffinity(0))},1,auto",
                        help="compute thread settings to compare (default: all cores, 1, auto)")
    parser.add_argument("--work", type=Path, default=None, help="folder for runs and logs (default: a new one under /tmp)")
    args = parser.parse_args()
    work = common.work_folder(args.work, "cpu-share")
    results = {setting: measure(setting, args.steps, work) for setting in args.settings.split(",")}
    print(f"\nREADME main command (MLX, built-in model, {args.steps} steps), trained tokens/s on "
          f"{len(os.sched_getaffinity(0))} cores:")
    print(f"{'threads':>8} {'alone':>8} {'beside a spinner':>17} {'two at once (each)':>20}  slowdown beside a spinner / pair")
    for setting, r in results.items():
        pair = r["two_at_once_each"]
        print(f"{setting:>8} {r['alone']:8.0f} {r['beside_a_spinner']:17.0f} {min(pair):9.0f} / {max(pair):<8.0f}"
              f"  {r['alone'] / r['beside_a_spinner']:.2f}x / {r['alone'] / (sum(pair) / 2):.2f}x")
    print(f"all numbers: {common.save(work, 'cpu-share', {'steps': args.steps, 'results': results})}")


if __name__ == "__main__":
    main()
