"""PyTorch LoRA: mlxft's PyTorch backend against transformers Trainer + PEFT, one run.

    python benchmarks/lora_torch.py                     # 2 warm-up + 5 timed steps of 4 rows per side
    python benchmarks/lora_torch.py --steps 20 --threads 2

Both sides: the SmolLM-135M-shaped random Llama (benchmarks/common.py), the bundled TALLRec
training rows as the same token ids (mlxft's encoding; the prompt carries no loss), LoRA r 8 /
alpha 16 / dropout 0 on q_proj and v_proj of all 30 layers, AdamW without weight decay, batch 4,
float32 on the CPU, torch.set_num_threads(T) and the same T in the BLAS thread variables.
- mlxft: `mlxft bench --workload lora --backends torch` (PEFT layers injected by mlxft; the LM
  head runs on answer positions only; length-grouped batches).
- transformers: Trainer + get_peft_model + DataCollatorForSeq2Seq, through
  benchmarks/peers/run_hf_trainer_lora.py, which times each step and counts its tokens.
Target (issue 8): mlxft at least 1.3x transformers Trainer + PEFT in processed tokens/s.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common


def encoded_rows(model: Path, path: Path) -> int:
    """{input_ids, labels} rows as mlxft encodes the tallrec recipe's training split."""
    from mlxft.config import load_config
    from mlxft.data.dataset import encode_split, load_splits
    from mlxft.models.files import load_tokenizer

    config = load_config("tallrec", ["data.max_history=10", f"model.name={model}"])
    splits = load_splits(config.data)
    examples, _ = encode_split(splits.train, splits, load_tokenizer(model), config.data)
    with open(path, "w") as f:
        f.writelines(json.dumps({"input_ids": e.input_ids,
                                "labels": [t if m else -100 for t, m in zip(e.input_ids, e.loss_mask)]}) + "\n" for e in examples)
    return len(examples)


def trainer_side(model: Path, args, work: Path, env: dict) -> dict:
    rows = work / "hf-rows.jsonl"
    encoded_rows(model, rows)
    return common.hf_peer_side("transformers Trainer + PEFT", "run_hf_trainer_lora.py", rows, model, args, env, work,
                               "hf-trainer")


def main() -> None:
    args = common.arguments(__doc__).parse_args()
    work = common.work_folder(args.work, "lora-torch")
    model = common.benchmark_model(args.model, args.vocab)
    env = common.side_environment(args.threads, fast_blas=False)  # no MLX here: nothing to preload

    ours = common.mlxft_bench("lora", "torch", model, args, work, env)
    theirs = trainer_side(model, args, work, env)
    print(f"\nmodel {model}; batch {args.batch_size}; {args.warmup} warm-up + {args.steps} timed steps per side; "
          f"torch threads: mlxft {ours['threads']}, Trainer {theirs['threads']}")
    sides = {"mlxft (torch)": ours, "Trainer+PEFT": theirs}
    ratios = common.print_comparison(
        "PyTorch LoRA: mlxft / transformers Trainer + PEFT", sides, "mlxft (torch)", "Trainer+PEFT",
        [("processed tok/s", "tokens_per_second"), ("processed tok per CPU-second", "tokens_per_cpu_second"),
         ("supervised tok/s", "supervised_tokens_per_second"),
         ("median step s", "median_step_seconds"), ("padding fraction", "padding_fraction"),
         ("peak RSS GB (timed steps)", "peak_memory_gb"), ("process peak RSS GB", "process_peak_rss_gb")],
        targets={"tokens_per_second": 1.3})
    common.save(work, "lora-torch", {"model": str(model), "args": vars(args),
                                     "versions": common.versions("torch", "transformers", "peft", "accelerate"),
                                     "sides": sides, "ratios": ratios})


if __name__ == "__main__":
    main()
