"""Data parallelism on one machine: tokens/s with 1 and with 2 ranks (one thread each) on the same
global batch, for both backends; the losses of the two (they must agree); the bytes all-reduced
per step and what that all-reduce costs here; and what it would cost between two Macs or 8 GPUs.

    python benchmarks/data_parallel.py                      # built-in model, LoRA, tallrec rows
    python benchmarks/data_parallel.py --full-finetune      # every weight's gradient crosses
    python benchmarks/data_parallel.py --model DIR --steps 20 --batch-size 8

Each side is `mlxft lora --recipe tallrec` (with --nproc 2 for two ranks: mlx.launch's ring over
loopback, torchrun with gloo), one report per step; tokens/s is the median of the steps after
--warmup. The all-reduce cost is measured by benchmarks/peers/allreduce_probe.py on the same
launchers, with a buffer of the run's trainable parameters (float32), as the step sends it.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

# What the estimates assume (not measured here): ranks, and per link the bus bandwidth a ring
# all-reduce achieves and the latency of one hop. A ring all-reduce of B bytes over N ranks sends
# 2 (N - 1) / N * B bytes per rank in 2 (N - 1) hops.
LINKS = {
    "two Macs over Thunderbolt 5 (TCP; assumed 6 GB/s, 50 us a hop)": (2, 6e9, 50e-6),
    "8 GPUs over NVLink 4 (NCCL; assumed 400 GB/s, 10 us a hop)": (8, 400e9, 10e-6),
}
# A size to set beside this run's: every weight of SmolLM2-135M (full fine-tuning), float32.
FULL_135M_BYTES = 4 * 134_515_008


def ring_seconds(nbytes: int, ranks: int, bandwidth: float, latency: float) -> float:
    return 2 * (ranks - 1) / ranks * nbytes / bandwidth + 2 * (ranks - 1) * latency

def side(backend: str, ranks: int, model: str, args, work: Path, env: dict) -> dict:
    out = work / f"{backend}-{ranks}"
    command = [sys.executable, "-m", "mlxft.cli", "lora", "--recipe", "tallrec", "--backend", backend, "--model", model,
               "--out", str(out), "--set", f"train.steps={args.warmup + args.steps}",
               "--set", f"train.batch_size={args.batch_size}", "--set", "train.report_every=1", "--set", "eval.every=0",
               "--set", f"train.checkpoint_every={args.warmup + args.steps + 1}", "--set", "eval.generate_examples=0",
               "--set", "data.max_valid_rows=8", "--set", f"lora.full_finetune={str(args.full_finetune).lower()}",
               "--set", "lora.dropout=0"]
    if ranks > 1:
        command += ["--nproc", str(ranks)]
    timing = common.run_side(f"{backend}, {ranks} rank(s)", command, env, work / f"{backend}-{ranks}.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    timed = [r["tokens_per_second"] for r in records[args.warmup:]]
    summary = json.loads((out / "summary.json").read_text())
    return {"tokens_per_second": statistics.median(timed), "losses": [r["loss"] for r in records],
            "trainable_parameters": summary["trainable_parameters"], "wall_seconds": timing["seconds"],
            "step_seconds": statistics.median([1.0 / r["tokens_per_second"] * (r["trained_tokens"] - p["trained_tokens"])
                                               for p, r in zip(records[args.warmup - 1:], records[args.warmup:])])}


def allreduce_seconds(backend: str, floats: int, work: Path, env: dict) -> float:
    probe = Path(__file__).resolve().parent / "peers" / "allreduce_probe.py"
    result = work / f"allreduce-{backend}.json"
    if backend == "mlx":
        command = [sys.executable, "-c", "import sys; from mlx._distributed_utils.launch import main; sys.exit(main())",
                   "-n", "2", "--backend", "ring", "--", sys.executable, str(probe), backend, str(floats), str(result)]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", str(probe), backend, str(floats),
                   str(result)]
    common.run_side(f"{backend} all-reduce of {floats:,} floats", command, env, work / f"allreduce-{backend}.log")
    return json.loads(result.read_text())["seconds"]


def main() -> None:
    parser = common.arguments(__doc__, steps=10, warmup=2, batch_size=8)
    parser.add_argument("--full-finetune", action="store_true", help="train every weight (default: LoRA, the recipe's)")
    args = parser.parse_args()
    work = common.work_folder(args.work, "data-parallel")
    model = args.model or "builtin"
    env = common.side_environment(1)  # one thread a rank: two ranks use the two cores
    results = {}
    for backend in ("mlx", "torch"):
        one, two = side(backend, 1, model, args, work, env), side(backend, 2, model, args, work, env)
        floats = one["trainable_parameters"] + 12  # the gradients, and the step's statistic sums
        reduce = allreduce_seconds(backend, floats, work, env)
        results[backend] = {
            "one_rank_tokens_per_second": one["tokens_per_second"],
            "two_ranks_tokens_per_second": two["tokens_per_second"],
            "speedup": two["tokens_per_second"] / one["tokens_per_second"],
            "largest_loss_difference": max(abs(a - b) for a, b in zip(one["losses"], two["losses"])),
            "trainable_parameters": one["trainable_parameters"],
            "bytes_all_reduced_per_step": 4 * floats,
            "all_reduce_seconds": reduce,
            "two_rank_step_seconds": two["step_seconds"],
            "communication_share": reduce / two["step_seconds"],
            "estimates_seconds": {link: {"this run": ring_seconds(4 * floats, *spec),
                                          "SmolLM2-135M, full fine-tuning": ring_seconds(FULL_135M_BYTES, *spec)}
                                  for link, spec in LINKS.items()},
        }
    print(f"\nmodel {model}; {'full fine-tuning' if args.full_finetune else 'LoRA'}; global batch {args.batch_size}; "
          f"{args.steps} timed steps after {args.warmup}; one thread a rank")
    print("| backend | 1 rank tok/s | 2 ranks tok/s | speed-up | max loss diff | bytes all-reduced a step | all-reduce here | share of a step |")
    print("|---|---|---|---|---|---|---|---|")
    for backend, r in results.items():
        print(f"| {backend} | {r['one_rank_tokens_per_second']:,.0f} | {r['two_ranks_tokens_per_second']:,.0f} | "
              f"{r['speedup']:.2f}x | {r['largest_loss_difference']:.1e} | {r['bytes_all_reduced_per_step']:,} | "
              f"{r['all_reduce_seconds'] * 1e3:.2f} ms | {r['communication_share']:.1%} |")
    estimates = next(iter(results.values()))["estimates_seconds"]
    for link, sizes in estimates.items():
        print(f"all-reduce estimate, {link}: " + ", ".join(f"{what} {seconds * 1e3:.2f} ms" for what, seconds in sizes.items()))
    common.save(work, "data_parallel", {"args": vars(args), "model": model, "results": results,
                                        "versions": common.versions("mlx", "torch")})


if __name__ == "__main__":
    main()
