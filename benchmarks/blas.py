"""MLX on Linux CPU: the stock mlx[cpu] wheel's reference BLAS against mlxft's OpenBLAS preload,
on the LoRA workload, one run.

    python benchmarks/blas.py                           # stock: 1 warm-up + 2 timed steps; OpenBLAS: 2 + 5
    python benchmarks/blas.py --stock-steps 4 --steps 10 --threads 2

Both sides run `mlxft bench --workload lora --backends mlx` on the SmolLM-135M-shaped random
Llama (benchmarks/common.py) with the bundled TALLRec rows, batch 4, LoRA r 8 on q_proj and
v_proj: once with MLXFT_BLAS=stock (no preload: the wheel's own libblas, which is
single-threaded), once with the shim mlxft preloads (scipy-openblas32's OpenBLAS, --threads
threads). A stock step of this model takes minutes, hence its smaller default step count.
Target (issue 8): at least 10x the stock wheel's processed tokens/s.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def main() -> None:
    parser = common.arguments(__doc__)
    parser.add_argument("--stock-steps", type=int, default=2, help="timed steps on the stock BLAS (default 2)")
    parser.add_argument("--stock-warmup", type=int, default=1, help="warm-up steps on the stock BLAS (default 1)")
    args = parser.parse_args()
    work = common.work_folder(args.work, "blas")
    model = common.benchmark_model(args.model, args.vocab)

    for name in ("openblas", "stock"):
        (work / name).mkdir(exist_ok=True)
    fast = common.mlxft_bench("lora", "mlx", model, args, work / "openblas",
                              common.side_environment(args.threads, fast_blas=True))
    stock_args = argparse.Namespace(**{**vars(args), "steps": args.stock_steps, "warmup": args.stock_warmup})
    stock = common.mlxft_bench("lora", "mlx", model, stock_args, work / "stock",
                               common.side_environment(args.threads, fast_blas=False))
    print(f"\nmodel {model}; batch {args.batch_size}")
    print(f"OpenBLAS side: {fast['mlx_blas']}; {fast['threads']} threads; "
          f"{args.warmup} warm-up + {args.steps} timed steps")
    print(f"stock side:    {stock['mlx_blas']}; {stock['threads']} thread; "
          f"{args.stock_warmup} warm-up + {args.stock_steps} timed steps")
    for side in (fast, stock):
        side["mlx_gemm_gflops"] = side["gemm_gflops"].get("mlx")
        side["first_step_loss"] = side["steps"][0]["loss"]  # same weights, same first batch: must agree
    sides = {"OpenBLAS": fast, "stock": stock}
    ratios = common.print_comparison(
        "MLX LoRA on Linux CPU: OpenBLAS preload / stock mlx[cpu] wheel", sides, "OpenBLAS", "stock",
        [("processed tok/s", "tokens_per_second"), ("processed tok per CPU-second", "tokens_per_cpu_second"),
         ("median step s", "median_step_seconds"),
         ("MLX 1024^3 GEMM GFLOP/s", "mlx_gemm_gflops"), ("share of peak GEMM", "peak_share"),
         ("loss at step 1 (equal work)", "first_step_loss")],
        targets={"tokens_per_second": 10})
    common.save(work, "blas", {"model": str(model), "args": vars(args), "versions": common.versions("mlx", "scipy-openblas32"),
                               "sides": sides, "ratios": ratios})


if __name__ == "__main__":
    main()
