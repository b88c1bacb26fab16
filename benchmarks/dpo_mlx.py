"""MLX DPO: mlxft against mlx-lm-lora's DPO trainer, same model, pairs, adapter and BLAS, one run.

    pip install mlx-lm-lora                             # the peer: for this benchmark only
    python benchmarks/dpo_mlx.py                        # 2 warm-up + 5 timed steps of 2 pairs per side
    python benchmarks/dpo_mlx.py --steps 20 --batch-size 4

Both sides: the SmolLM-135M-shaped random Llama (benchmarks/common.py), the training split of the
bundled preference pairs (data/preference-sample.jsonl, the dpo recipe's split) rendered through
the tokenizer's chat template, LoRA r 8 / alpha 16 (scale 2) / dropout 0 on every linear layer
(q, k, v, o, gate, up, down) of all 30 layers, sigmoid loss with beta 0.1, AdamW without weight
decay, float32 on MLX's CPU backend with mlxft's OpenBLAS preload and the same thread count.
- mlxft: `mlxft bench --workload dpo --backends mlx`: the reference is the same model with its
  adapter switched off (no second copy), chosen and rejected run in one forward with each prompt
  once (dpo.share_prompt, the trainer's default), the LM head runs on answer tokens only.
- mlx-lm-lora: its DPO trainer (a second full model as the reference; chosen and rejected as
  two forwards each), through benchmarks/peers/run_mlx_lm_lora_dpo.py, which reads each step's time
  and rows and lets it run on Linux (see there).
Compilation: both compile their step once per batch shape; as in lora_mlx.py, mlxft's bench
traces its shapes before timing and the peer's steady steps (shape seen before) lead the
comparison, with its all-steps figure printed too.
Processed tokens count the rows as the peer runs them (each prompt with each answer) on both
sides, so with the same pairs the ratio is also the ratio of pairs per second.
Target (issue 8): mlxft at least 1.5x mlx-lm-lora in processed tokens/s, with peak memory below
mlx-lm-lora's by at least one copy of the model weights.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

ALL_LINEAR = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"


def preference_rows() -> list[dict]:
    """The dpo recipe's training pairs, as {prompt, chosen, rejected} rows."""
    from mlxft.config import load_config
    from mlxft.data.dataset import load_preference_splits

    config = load_config("dpo")
    splits = load_preference_splits(config.data, config.dpo.support_ratio)
    return [{k: r.fields[k] for k in ("prompt", "chosen", "rejected")} for r in splits.train]


def weights_gb(model: Path) -> float:
    return sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9


def peer_side(model: Path, args, work: Path, env: dict) -> dict:
    try:
        import mlx_lm_lora  # noqa: F401
    except ImportError:
        sys.exit("mlx-lm-lora is not installed. It is the peer of this benchmark only (not an mlxft dependency):\n"
                 "    pip install mlx-lm-lora")
    data = work / "mlx-lm-lora-data"
    data.mkdir(exist_ok=True)
    rows = preference_rows()
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: args.batch_size]))
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    config = {
        "model": str(model), "train": True, "train_mode": "dpo", "train_type": "lora", "data": str(data),
        "num_layers": layers, "batch_size": args.batch_size, "iters": args.warmup + args.steps,
        "learning_rate": 5e-5, "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}, "beta": 0.1, "dpo_cpo_loss_type": "sigmoid",
        "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 1, "save_every": 10**6,
        "max_seq_length": 1024, "seed": 0, "fuse": False, "adapter_path": str(work / "mlx-lm-lora-adapters"),
    }
    (work / "mlx-lm-lora-config.yaml").write_text(json.dumps(config))
    result = work / "mlx-lm-lora-result.json"
    process = common.run_side("mlx-lm-lora DPO", [sys.executable, str(Path(__file__).parent / "peers" / "run_mlx_lm_lora_dpo.py"),
                                                 str(result), "--", "-c", str(work / "mlx-lm-lora-config.yaml")],
                              env, work / "mlx-lm-lora.log")
    steps = json.loads(result.read_text())["steps"]
    return {**common.compiled_peer_summary(steps, args.warmup), "peak_memory_gb": max(s["peak_memory_gb"] for s in steps),
            "process_peak_rss_gb": process["peak_rss_gb"], "steps": steps}


def main() -> None:
    args = common.arguments(__doc__, batch_size=2).parse_args()
    work = common.work_folder(args.work, "dpo-mlx")
    model = common.benchmark_model(args.model, args.vocab)
    env = common.side_environment(args.threads, fast_blas=True)

    ours = common.mlxft_bench("dpo", "mlx", model, args, work, env,
                              extra=["--set", f"lora.target_modules={ALL_LINEAR}", "--set", "data.template=chat",
                                     "--set", "train.learning_rate=5e-5"])
    theirs = peer_side(model, args, work, env)
    print(f"\nmodel {model} ({weights_gb(model):.2f} GB of weights); {args.batch_size} pairs a step; {args.warmup} warm-up + "
          f"{args.steps} timed steps per side; {args.threads} threads per side; MLX BLAS: {ours['mlx_blas']}")
    ours["all_tokens_per_second"] = ours["tokens_per_second"]  # the bench traced every shape before timing
    print(f"mlxft traced its batch shapes in {ours['shape_warmup_seconds']:.1f} s before timing; mlx-lm-lora: "
          f"{theirs['distinct_shapes']} shapes (it pads each batch to its own longest row), {theirs['steady_steps']} of "
          f"{args.steps} timed steps with a shape seen before; its figures: {theirs['basis']}")
    sides = {"mlxft (mlx)": ours, "mlx-lm-lora": theirs}
    ratios = common.print_comparison(
        "MLX DPO: mlxft / mlx-lm-lora", sides, "mlxft (mlx)", "mlx-lm-lora",
        [("processed tok/s", "tokens_per_second"), ("processed tok per CPU-second", "tokens_per_cpu_second"),
         ("processed tok/s, all timed steps", "all_tokens_per_second"),
         ("median step s", "median_step_seconds"),
         ("padding fraction", "padding_fraction"), ("MLX peak memory GB", "peak_memory_gb"),
         ("process peak RSS GB", "process_peak_rss_gb")],
        targets={"tokens_per_second": 1.5})
    saved = theirs["peak_memory_gb"] - ours["peak_memory_gb"]
    print(f"MLX peak memory saved: {saved:.2f} GB; one copy of the weights is {weights_gb(model):.2f} GB "
          f"(target: at least one copy: {'met' if saved >= weights_gb(model) else 'MISSED'})")
    common.save(work, "dpo-mlx", {"model": str(model), "args": vars(args), "weights_gb": weights_gb(model),
                                  "versions": common.versions("mlx", "mlx-lm", "mlx-lm-lora"),
                                  "sides": sides, "ratios": ratios, "memory_saved_gb": saved})


if __name__ == "__main__":
    main()
