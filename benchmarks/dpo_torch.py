"""PyTorch DPO: mlxft's PyTorch backend against TRL's DPOTrainer + PEFT, one run.

    pip install trl                                     # the peer: for this benchmark only
    python benchmarks/dpo_torch.py                      # 2 warm-up + 5 timed steps of 2 pairs per side
    python benchmarks/dpo_torch.py --steps 20 --batch-size 4

Both sides: the SmolLM-135M-shaped random Llama (benchmarks/common.py), the training split of the
bundled preference pairs (the dpo recipe's split) rendered through the tokenizer's chat template,
LoRA r 8 / alpha 16 / dropout 0 on every linear layer of all 30 layers, sigmoid loss with beta
0.1, AdamW without weight decay, float32 on the CPU, the same torch and BLAS thread counts. The
reference is the base model with the adapter disabled on both sides (no second copy).
- mlxft: `mlxft bench --workload dpo --backends torch` (the PyTorch engine's DPO step, the one mlxft.methods.dpo runs): each
  prompt runs once for both answers (dpo.share_prompt, the trainer's default).
- TRL: DPOTrainer with a peft LoraConfig, through benchmarks/peers/run_trl_dpo.py: prompt +
  chosen and prompt + rejected as rows of one concatenated forward.
Processed tokens count the rows as TRL runs them (each prompt with each answer) on both sides, so
with the same pairs the ratio is also the ratio of pairs per second.
Target (issue 8): mlxft at least 1.3x TRL in processed tokens/s, at no more than its peak memory.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common
from dpo_mlx import ALL_LINEAR, preference_rows


def trl_side(model: Path, args, work: Path, env: dict) -> dict:
    try:
        import trl  # noqa: F401
    except ImportError:
        sys.exit("trl is not installed. It is the peer of this benchmark only (not an mlxft dependency):\n"
                 "    pip install trl")
    pairs = work / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r) + "\n" for r in preference_rows()))
    return common.hf_peer_side("TRL DPOTrainer + PEFT", "run_trl_dpo.py", pairs, model, args, env, work, "trl")


def main() -> None:
    args = common.arguments(__doc__, batch_size=2).parse_args()
    work = common.work_folder(args.work, "dpo-torch")
    model = common.benchmark_model(args.model, args.vocab)
    env = common.side_environment(args.threads, fast_blas=False)  # no MLX here: nothing to preload

    ours = common.mlxft_bench("dpo", "torch", model, args, work, env,
                              extra=["--set", f"lora.target_modules={ALL_LINEAR}", "--set", "data.template=chat",
                                     "--set", "train.learning_rate=5e-5"])
    theirs = trl_side(model, args, work, env)
    print(f"\nmodel {model}; {args.batch_size} pairs a step; {args.warmup} warm-up + {args.steps} timed steps per side; "
          f"torch threads: mlxft {ours['threads']}, TRL {theirs['threads']}")
    sides = {"mlxft (torch)": ours, "TRL DPOTrainer": theirs}
    ratios = common.print_comparison(
        "PyTorch DPO: mlxft / TRL DPOTrainer + PEFT", sides, "mlxft (torch)", "TRL DPOTrainer",
        [("processed tok/s", "tokens_per_second"), ("processed tok per CPU-second", "tokens_per_cpu_second"),
         ("supervised tok/s", "supervised_tokens_per_second"),
         ("median step s", "median_step_seconds"), ("padding fraction", "padding_fraction"),
         ("peak RSS GB (timed steps)", "peak_memory_gb"), ("process peak RSS GB", "process_peak_rss_gb")],
        targets={"tokens_per_second": 1.3})
    print(f"peak memory (RSS over the timed steps): mlxft {ours['peak_memory_gb']:.2f} GB, TRL {theirs['peak_memory_gb']:.2f} GB "
          f"(target: no more than TRL's: {'met' if ours['peak_memory_gb'] <= theirs['peak_memory_gb'] else 'MISSED'})")
    common.save(work, "dpo-torch", {"model": str(model), "args": vars(args),
                                    "versions": common.versions("torch", "transformers", "peft", "trl"),
                                    "sides": sides, "ratios": ratios})


if __name__ == "__main__":
    main()
