"""TRL's DPOTrainer + PEFT, observed step by step: the peer side of dpo_torch.py.

    pip install trl                  # a benchmark-only peer, not an mlxft dependency
    python benchmarks/peers/run_trl_dpo.py PAIRS_JSONL RESULT_JSON --model DIR --steps N --warmup W \
        --batch-size B --threads T [--learning-rate 5e-5]

What a TRL user would write: the model in float32, DPOConfig (beta 0.1, sigmoid loss; its
defaults of gradient checkpointing and bf16 autocast switched off, to match mlxft's side) and
DPOTrainer with a peft LoraConfig (r 8, alpha 16, dropout 0, all linear layers) and no reference
model, so TRL takes the base model with the adapter disabled as the reference. PAIRS_JSONL holds
{prompt, chosen, rejected} rows; they are given to TRL in its conversational form (a user
message, an assistant answer), so the tokenizer's chat template renders them, as on the mlxft
side (data.template=chat). Observers only (hf_observe.py): step times, the tokens of each
step's training forward, losses, peak RSS over the timed steps.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("pairs")
    parser.add_argument("result")
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, default=5e-5)
    args = parser.parse_args()

    try:
        from trl import DPOConfig, DPOTrainer
    except ImportError:
        sys.exit("trl is not installed; it is a benchmark-only peer: pip install trl")
    import torch
    from datasets import Dataset
    from hf_observe import count_training_forwards, peak_rss_gb, step_timer
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    rows = [json.loads(line) for line in Path(args.pairs).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": r["prompt"]}],
                                  "chosen": [{"role": "assistant", "content": r["chosen"]}],
                                  "rejected": [{"role": "assistant", "content": r["rejected"]}]} for r in rows])
    config = DPOConfig(
        output_dir=str(Path(args.result).parent / "trl-out"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=args.learning_rate, weight_decay=0.0, beta=0.1,
        loss_type=["sigmoid"], logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
        disable_tqdm=True, max_length=1024,
        # TRL's DPOConfig turns both on by default; mlxft's side runs float32 without checkpointing.
        gradient_checkpointing=False, bf16=False)
    peft_config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    forwards, steps = [], []
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[step_timer(forwards, steps, args.warmup)])
    count_training_forwards(trainer.model, forwards)
    trainer.train()
    Path(args.result).write_text(json.dumps({"steps": steps, "peak_rss_gb": peak_rss_gb(),
                                             "threads": torch.get_num_threads(), "forwards": len(forwards)}, indent=2))


if __name__ == "__main__":
    main()
