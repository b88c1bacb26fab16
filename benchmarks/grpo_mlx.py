"""MLX GRPO: mlxft against mlx-lm-lora's GRPO trainer, same model, prompts, G, lengths, adapter and
BLAS, one run.

    pip install mlx-lm-lora                             # the peer: for this benchmark only
    python benchmarks/grpo_mlx.py                       # 2 warm-up + 5 timed steps of 2 prompts x 8 completions a side
    python benchmarks/grpo_mlx.py --steps 10 --generations 4 --completion-length 64

Both sides: the SmolLM-135M-shaped random Llama (benchmarks/common.py), the grpo recipe's training
prompts (data/arithmetic.jsonl) rendered by mlxft (the peer is handed the same token ids, see
peers/run_mlx_lm_lora_grpo.py), G completions per prompt of at most --completion-length tokens
sampled at temperature 1, the reward of peers/grpo_rewards.py (a random model answers no sum),
group-normalised advantages, the grpo loss with epsilon 0.2 and beta 0.04 (so both run the
reference), LoRA r 8 / alpha 16 (scale 2) / dropout 0 on every linear layer of all 30 layers,
AdamW without weight decay, float32 on MLX's CPU backend with mlxft's OpenBLAS preload and the
same thread count.
- mlxft: `mlxft rl --recipe grpo --backend mlx`, as a user runs it: the reference is the same
  model with the adapter switched off; each prompt runs once and its KV cache is copied to its G
  rows.
- mlx-lm-lora: its GRPO trainer (a second full model as the reference; prompts cached once and
  forked per completion; its BatchGenerator with at most batch-size sequences at a time, as it
  sets it), sampling with its fixed top_k 20 and top_p 0.95 (train.py does not pass them).
A random model rarely samples its end token, so nearly every completion runs to the limit on both
sides: the mean completion lengths are printed to show it.
Time per step: mlxft's from its metrics.jsonl (trained tokens / tokens per second of the step's
report), the peer's from its callback (1 / iterations per second); both exclude the validation
before the first step.
Target (issue 17): mlxft at least 1.5x mlx-lm-lora in completions/s, with peak memory below
mlx-lm-lora's by at least one copy of the model weights.
"""

from __future__ import annotations

import json
import shutil
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common

HERE = Path(__file__).resolve().parent
ALL_LINEAR = "[q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj]"
REWARD = HERE / "peers" / "grpo_rewards.py"


def prompt_rows(model: Path) -> list[dict]:
    """The grpo recipe's training prompts as mlxft renders them for `model`: {prompt, answer, prompt_ids}."""
    from mlxft.config import load_config
    from mlxft.data.dataset import load_prompt_splits
    from mlxft.methods.rollouts import encode_prompts
    from mlxft.models.files import load_tokenizer

    config = load_config("grpo")
    splits = load_prompt_splits(config.data)
    train, _, _ = encode_prompts(splits, load_tokenizer(model), config, echo=lambda *a: None)
    return [{"prompt": e.text, "answer": str(splits.train[e.row].fields.get("answer", "")), "prompt_ids": e.ids}
            for e in train]


def summarize(steps: list[dict], warmup: int) -> dict:
    timed = steps[warmup:]
    seconds = sum(s["seconds"] for s in timed)
    cpu = [s["cpu_seconds"] for s in timed if s.get("cpu_seconds")]
    completions = sum(s["completions"] for s in timed)
    tokens = sum(s["completions"] * s["mean_completion_tokens"] for s in timed)
    return {"completions_per_second": completions / seconds, "completion_tokens_per_second": tokens / seconds,
            "median_step_seconds": statistics.median(s["seconds"] for s in timed),
            "mean_completion_tokens": tokens / completions,
            "completions_per_cpu_second": completions * len(cpu) / len(timed) / sum(cpu) if cpu else None,
            "peak_memory_gb": max(s["peak_memory_gb"] for s in steps)}


def ours_side(model: Path, args, work: Path, env: dict) -> dict:
    out = work / "mlxft-rl"
    shutil.rmtree(out, ignore_errors=True)
    settings = [f"train.steps={args.warmup + args.steps}", f"train.batch_size={args.batch_size}", "train.report_every=1",
                f"rl.num_generations={args.generations}", f"rl.max_completion_length={args.completion_length}",
                "rl.temperature=1.0", "rl.top_p=1.0", "rl.beta=0.04", "rl.epsilon=0.2", "rl.loss_type=grpo",
                f"rl.reward_functions=[{REWARD}:varied]", f"lora.target_modules={ALL_LINEAR}", "lora.dropout=0.0",
                "train.weight_decay=0.0", "train.learning_rate=1e-5", "eval.every=0", "data.max_valid_rows=2",
                "train.checkpoint_every=1000", "rl.log_completions_every=0",
                f"rl.completions_per_pass={args.completions_per_pass or 'null'}",
                f"train.grad_checkpoint={'true' if args.grad_checkpoint else 'false'}"]
    command = [sys.executable, "-m", "mlxft", "rl", "--recipe", "grpo", "--backend", "mlx", "--model", str(model),
               "--out", str(out), *[a for s in settings for a in ("--set", s)]]
    process = common.run_side("mlxft GRPO (mlx)", command, env, work / "mlxft-rl.log")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    records = [r for r in records if "tokens_per_second" in r]
    steps, previous = [], 0
    for r in records:
        seconds = (r["trained_tokens"] - previous) / r["tokens_per_second"]
        previous = r["trained_tokens"]
        steps.append({"step": r["step"], "seconds": seconds, "cpu_seconds": None, "loss": r["loss"],
                      "completions": args.batch_size * args.generations,
                      "mean_completion_tokens": r["completions/mean_length"], "reward": r["reward"],
                      "peak_memory_gb": r["peak_memory_gb"]})
    return {**summarize(steps, args.warmup), "process_peak_rss_gb": process["peak_rss_gb"], "steps": steps}


def peer_side(model: Path, args, work: Path, env: dict) -> dict:
    try:
        import mlx_lm_lora  # noqa: F401
    except ImportError:
        sys.exit("mlx-lm-lora is not installed. It is the peer of this benchmark only (not an mlxft dependency):\n"
                 "    pip install mlx-lm-lora")
    data = work / "mlx-lm-lora-data"
    data.mkdir(exist_ok=True)
    rows = prompt_rows(model)
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "valid.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[: args.batch_size]))
    layers = json.loads((model / "config.json").read_text())["num_hidden_layers"]
    config = {
        "model": str(model), "train": True, "train_mode": "grpo", "train_type": "lora", "data": str(data),
        "num_layers": layers, "batch_size": args.batch_size, "iters": args.warmup + args.steps,
        "learning_rate": 1e-5, "optimizer": "adamw", "optimizer_config": {"adamw": {"weight_decay": 0.0}},
        "lora_parameters": {"rank": 8, "scale": 2.0, "dropout": 0.0}, "beta": 0.04, "epsilon": 0.2,
        "group_size": args.generations, "max_completion_length": args.completion_length, "temperature": 1.0,
        "grpo_loss_type": "grpo", "reward_functions": "varied",
        "steps_per_report": 1, "steps_per_eval": 10**6, "val_batches": 1, "save_every": 10**6,
        "max_seq_length": 1024, "seed": 0, "fuse": False, "adapter_path": str(work / "mlx-lm-lora-adapters"),
    }
    (work / "mlx-lm-lora-config.yaml").write_text(json.dumps(config))
    result = work / "mlx-lm-lora-result.json"
    # Its command line, not its YAML: mlx-lm-lora keeps a YAML value only where the argument's
    # default is None, so a config's group_size, max_completion_length, epsilon and temperature
    # are silently replaced by 4, 512, 1e-4 and 1.0 (mlx_lm_lora.train.main, 5.10.2).
    flags = ["--group-size", str(args.generations), "--max-completion-length", str(args.completion_length),
             "--epsilon", "0.2", "--temperature", "1.0", "--grpo-loss-type", "grpo"]
    process = common.run_side("mlx-lm-lora GRPO", [sys.executable, str(HERE / "peers" / "run_mlx_lm_lora_grpo.py"),
                                                  str(result), "--", "-c", str(work / "mlx-lm-lora-config.yaml"), *flags],
                              env, work / "mlx-lm-lora.log")
    steps = json.loads(result.read_text())["steps"]
    return {**summarize(steps, args.warmup), "process_peak_rss_gb": process["peak_rss_gb"], "steps": steps}


def weights_gb(model: Path) -> float:
    return sum(p.stat().st_size for p in model.glob("*.safetensors")) / 1e9


def main() -> None:
    parser = common.arguments(__doc__, batch_size=2)
    parser.add_argument("--generations", type=int, default=8, help="completions per prompt, G (default 8)")
    parser.add_argument("--completion-length", type=int, default=32, help="most tokens per completion (default 32)")
    parser.add_argument("--completions-per-pass", type=int, default=None,
                        help="mlxft's rl.completions_per_pass (default: all of a step's completions in one pass)")
    parser.add_argument("--grad-checkpoint", action="store_true",
                        help="mlxft's train.grad_checkpoint: recompute each block's activations in the backward pass")
    parser.add_argument("--ours-only", action="store_true", help="run mlxft's side only (no comparison)")
    args = parser.parse_args()
    work = common.work_folder(args.work, "grpo-mlx")
    model = common.benchmark_model(args.model, args.vocab)
    env = common.side_environment(args.threads, fast_blas=True)

    ours = ours_side(model, args, work, env)
    if args.ours_only:
        print(json.dumps({k: v for k, v in ours.items() if k != "steps"}, indent=1))
        return
    theirs = peer_side(model, args, work, env)
    print(f"\nmodel {model} ({weights_gb(model):.2f} GB of weights); {args.batch_size} prompts x {args.generations} "
          f"completions of at most {args.completion_length} tokens a step; {args.warmup} warm-up + {args.steps} timed "
          f"steps per side; {args.threads} threads per side")
    sides = {"mlxft (mlx)": ours, "mlx-lm-lora": theirs}
    ratios = common.print_comparison(
        "MLX GRPO: mlxft / mlx-lm-lora", sides, "mlxft (mlx)", "mlx-lm-lora",
        [("completions/s", "completions_per_second"), ("completion tokens/s", "completion_tokens_per_second"),
         ("median step s", "median_step_seconds"), ("mean completion tokens", "mean_completion_tokens"),
         ("MLX peak memory GB", "peak_memory_gb"), ("process peak RSS GB", "process_peak_rss_gb")],
        targets={"completions_per_second": 1.5})
    saved = theirs["peak_memory_gb"] - ours["peak_memory_gb"]
    print(f"MLX peak memory saved: {saved:.2f} GB; one copy of the weights is {weights_gb(model):.2f} GB "
          f"(target: at least one copy: {'met' if saved >= weights_gb(model) else 'MISSED'})")
    common.save(work, "grpo-mlx", {"model": str(model), "args": vars(args), "weights_gb": weights_gb(model),
                                   "versions": common.versions("mlx", "mlx-lm", "mlx-lm-lora"),
                                   "sides": sides, "ratios": ratios, "memory_saved_gb": saved})


if __name__ == "__main__":
    main()
