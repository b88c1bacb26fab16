"""transformers Trainer + PEFT LoRA, observed step by step: the peer side of lora_torch.py.

    python benchmarks/peers/run_hf_trainer_lora.py ROWS_JSONL RESULT_JSON --model DIR --steps N --warmup W \
        --batch-size B --threads T [--learning-rate 3e-4] [--r 8 --alpha 16 --targets q_proj,v_proj]

What a PyTorch user would write: AutoModelForCausalLM in float32, peft.get_peft_model with a
LoraConfig, DataCollatorForSeq2Seq (labels padded with -100), and Trainer with its defaults
(AdamW, shuffled batches, the loss over full logits) for warmup + steps optimizer steps on the
CPU. ROWS_JSONL holds {"input_ids", "labels"} rows: the same token ids mlxft trains on, the prompt
labelled -100 (completion-only loss, as mlxft's recipe).

Observers, nothing else: a TrainerCallback notes the clock at each step's end (a step's time is
from the previous step's end, data loading included, as a training loop's wall time is), and a
forward pre-hook counts each step's non-padding tokens (attention_mask), padded tokens and
scored labels. The process's peak RSS is reset after the warm-up (Linux /proc/self/clear_refs).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows")
    parser.add_argument("result")
    parser.add_argument("--model", required=True)
    parser.add_argument("--steps", type=int, required=True)
    parser.add_argument("--warmup", type=int, required=True)
    parser.add_argument("--batch-size", type=int, required=True)
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--learning-rate", type=float, default=3e-4)
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16)
    parser.add_argument("--targets", default="q_proj,v_proj")
    args = parser.parse_args()

    import torch
    from hf_observe import count_training_forwards, peak_rss_gb, step_timer
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainingArguments

    torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=args.alpha, lora_dropout=0.0,
                                             target_modules=args.targets.split(","), task_type="CAUSAL_LM"))
    rows = [json.loads(line) for line in Path(args.rows).read_text().splitlines() if line.strip()]

    forwards, steps = [], []
    count_training_forwards(model, forwards)
    training = TrainingArguments(
        output_dir=str(Path(args.result).parent / "hf-trainer-out"), per_device_train_batch_size=args.batch_size,
        max_steps=args.warmup + args.steps, learning_rate=args.learning_rate, weight_decay=0.0, logging_steps=1,
        save_strategy="no", report_to=[], use_cpu=True, dataloader_num_workers=0, seed=0, disable_tqdm=True,
        remove_unused_columns=False)
    trainer = Trainer(model=model, args=training, train_dataset=rows,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[step_timer(forwards, steps, args.warmup)])
    trainer.train()
    Path(args.result).write_text(json.dumps({"steps": steps, "peak_rss_gb": peak_rss_gb(), "threads": torch.get_num_threads(),
                                             "forwards": len(forwards)}, indent=2))


if __name__ == "__main__":
    main()
