"""MLX LoRA: mlxft against mlx-lm's `mlx_lm.lora`, same model, rows, adapter and BLAS, one run.

    python benchmarks/lora_mlx.py                       # 2 warm-up + 5 timed steps of 4 rows per side
    python benchmarks/lora_mlx.py --steps 20 --threads 2

Both sides: the SmolLM-135M-shaped random Llama (benchmarks/common.py), the bundled TALLRec
training rows, LoRA r 8 / alpha 16 (mlx-lm: scale 2) / dropout 0 on q_proj and v_proj of all
30 layers, AdamW without weight decay, batch 4, float32, MLX's CPU backend with mlxft's
OpenBLAS preload and the same thread count.
- mlxft: `mlxft bench --workload lora --backends mlx` (the trainer's compiled step; prompt
  masked, the LM head on answer tokens only; length-grouped batches padded to a multiple of 16).
- mlx-lm: its LoRA trainer on {"text": prompt + answer} rows (the same text; mlx-lm computes the
  head and loss at every position whatever it masks, so masking changes its loss, not its work),
  through benchmarks/peers/run_mlx_lm.py, which reads each step's time and rows.

Compilation: both compile their step once per batch shape. mlxft's bench traces every shape of
its run before timing (the steady state of a long run); for mlx-lm the comparison takes its timed
steps whose batch shape an earlier step had (benchmarks/common.py: compiled_peer_summary), and
prints its figure over all timed steps too.
Target (issue 8): mlxft at least 1.3x mlx_lm.lora in processed tokens/s, with less padding.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def mlx_lm_side(model: Path, args, work: Path, env: dict) -> dict:
    data = work / "mlx-lm-data"
    data.mkdir(exist_ok=True)
    rows = common.tallrec_training_rows()
    with open(data / "train.jsonl", "w") as f:
        f.writelines(json.dumps({"text": row["prompt"] + row["completion"]}) + "\n" for row in rows)
    with open(data / "valid.jsonl", "w") as f:
        f.writelines(json.dumps({"text": row["prompt"] + row["completion"]}) + "\n" for row in rows[: args.batch_size])
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    config = {
        "model": str(model), "train": True, "data": str(data), "fine_tune_type": "lora",
        "num_layers": layers, "batch_size": args.batch_size, "iters": args.warmup + args.steps,
        "learning_rate": 3e-4, "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0, "keys": ["self_attn.q_proj", "self_attn.v_proj"]},
        "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 1, "save_every": 10**6,
        "max_seq_length": 2048, "seed": 0, "adapter_path": str(work / "mlx-lm-adapters"),
    }
    (work / "mlx-lm-config.yaml").write_text(json.dumps(config))  # JSON is YAML
    result = work / "mlx-lm-result.json"
    process = common.run_side("mlx_lm.lora", [sys.executable, str(Path(__file__).parent / "peers" / "run_mlx_lm.py"),
                                             str(result), "--", "-c", str(work / "mlx-lm-config.yaml")],
                              env, work / "mlx-lm.log")
    steps = json.loads(result.read_text())["steps"]
    for step in steps:
        step["supervised_tokens"] = step["counted_tokens"]  # every token is scored in text rows
    side = common.compiled_peer_summary(steps, args.warmup)
    side.update(process_peak_rss_gb=process["peak_rss_gb"], peak_memory_gb=steps[-1]["peak_memory_gb"], steps=steps,
                counted_equals_processed=all(s["counted_tokens"] == s["tokens"] for s in steps))
    return side


def main() -> None:
    args = common.arguments(__doc__).parse_args()
    work = common.work_folder(args.work, "lora-mlx")
    model = common.benchmark_model(args.model, args.vocab)
    env = common.side_environment(args.threads, fast_blas=True)

    ours = common.mlxft_bench("lora", "mlx", model, args, work, env)
    ours["all_tokens_per_second"] = ours["tokens_per_second"]  # the bench traced every shape before timing
    theirs = mlx_lm_side(model, args, work, env)

    print(f"\nmodel {model}; batch {args.batch_size}; {args.warmup} warm-up + {args.steps} timed steps per side; "
          f"{args.threads} threads per side; MLX BLAS: {ours['mlx_blas']}")
    print(f"mlxft traced its {len({s['padded_tokens'] // s['rows'] for s in ours['steps']})} batch shapes in "
          f"{ours['shape_warmup_seconds']:.1f} s before timing; mlx-lm: {theirs['distinct_shapes']} shapes, "
          f"{theirs['steady_steps']} of {args.steps} timed steps with a shape seen before; its figures: {theirs['basis']}")
    sides = {"mlxft (mlx)": ours, "mlx_lm.lora": theirs}
    ratios = common.print_comparison(
        "MLX LoRA: mlxft / mlx_lm.lora", sides, "mlxft (mlx)", "mlx_lm.lora",
        [("processed tok/s", "tokens_per_second"), ("processed tok per CPU-second", "tokens_per_cpu_second"),
         ("processed tok/s, all timed steps", "all_tokens_per_second"),
         ("median step s", "median_step_seconds"), ("padding fraction", "padding_fraction"),
         ("MLX peak memory GB", "peak_memory_gb"), ("process peak RSS GB", "process_peak_rss_gb")],
        targets={"tokens_per_second": 1.3})
    if not theirs["counted_equals_processed"]:
        print("note: mlx-lm's own token count differs from the tokens of the rows it drew (truncation?)")
    common.save(work, "lora-mlx", {"model": str(model), "args": vars(args), "versions": common.versions("mlx", "mlx-lm"),
                                   "sides": sides, "ratios": ratios})


if __name__ == "__main__":
    main()
