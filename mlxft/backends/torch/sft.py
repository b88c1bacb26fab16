"""Supervised fine-tuning (LoRA or full) on PyTorch: CUDA, MPS or CPU. Reads top to bottom:
setup -> model -> data -> optimizer -> loop -> save. The twin of mlxft.backends.mlx.sft: same
recipes, same metric names, same run folder and summary.json keys.

    mlxft lora --recipe tallrec --backend torch
    mlxft lora --recipe tallrec --backend torch --model Qwen/Qwen2.5-0.5B-Instruct --data MINDsmall_train

Supports: LoRA through PEFT (from the same AdapterSpec as MLX) or full fine-tuning; QLoRA through
bitsandbytes on CUDA; MLX's AdamW update (see adamw.py) with warmup and cosine / linear / constant
decay; gradient accumulation weighted by scored tokens (k micro-batches give exactly the gradient
of one batch k times the size); gradient clipping; steps or epochs; length-grouped batches; the LM
head run on scored positions only; bf16 autocast on CUDA; gradient checkpointing; validation loss
(and AUC for Yes/No data) every N steps with the best adapter kept and early stopping; atomic
checkpoints every N steps and --resume that reproduces the losses of an uninterrupted run;
metrics.jsonl, summary.json and a progress bar with loss and tokens/s.

Raises UserError for bad recipes, data, models and adapters, and for --quantize without CUDA.
"""

from __future__ import annotations

import json
import time

import torch

from mlxft.adapters import AdapterSpec, load_adapter
from mlxft.backends.torch import PAD_MULTIPLE, checkpoint, lora
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.backends.torch.evaluate import evaluate
from mlxft.backends.torch.generate import generate_answer
from mlxft.config import RunConfig
from mlxft.data.batching import scored_targets
from mlxft.data.dataset import encode_split, load_splits
from mlxft.data.templates import describe_template
from mlxft.errors import UserError
from mlxft.model_files import BUILTIN
from mlxft.model_files import pad_id as pad_id_of
from mlxft.progress import Progress
from mlxft.runs import Run
from mlxft.saved_check import check_saved_adapter, probe_ids
from mlxft.schedule import learning_rate
from mlxft.training import answer_held_out, answer_ids_for, batch_stream, count_steps, describe, mean_rate, track_best


def train(config: RunConfig, run: Run, *, resume: bool = False, adapter: str | None = None, echo=print) -> dict:
    """Train as `config` says, writing into `run`; returns the summary (also in summary.json)."""
    tc, ec = config.train, config.eval

    # --- setup -----------------------------------------------------------------------------
    device = torch_model.pick_device()
    splits = load_splits(config.data)  # rows first: a data mistake should not wait for a model to load

    # --- model -----------------------------------------------------------------------------
    model, tokenizer, folder = torch_model.load(config.model.name, quantize=config.model.quantize,
                                                trust_remote_code=config.model.trust_remote_code, device=device)
    split_head = torch_model.can_split_head(model, folder)
    base_name = str(folder) if config.model.name == BUILTIN else config.model.name
    spec = AdapterSpec(config.lora.r, config.lora.alpha, config.lora.dropout, list(config.lora.target_modules),
                       base_name, config.lora.layers)
    torch.manual_seed(tc.seed)  # here, not before loading: the LoRA initialisation is a function of the seed alone
    if resume and not config.lora.full_finetune:
        # A run that continued another adapter trains that adapter's modules, not the recipe's.
        spec = load_adapter(run.checkpoint_dir / "weights")[0]
    if config.lora.full_finetune:
        if config.model.quantize or torch_model.is_quantized(model):
            raise UserError("full fine-tuning needs a full-precision model; use LoRA on a quantized one")
        lora.unfreeze_all(model)
    elif adapter:
        spec, weights = load_adapter(adapter)  # continue an existing adapter (TALLRec starts from Alpaca's)
        lora.load_adapter_weights(model, spec, weights, adapter)
    else:
        lora.apply_lora(model, spec)
    if tc.grad_checkpoint:
        torch_model.enable_gradient_checkpointing(model)  # with LoRA dropout too: see that function
    trainable, total = lora.trainable_parameters(model), lora.total_parameters(model)
    echo(f"model {folder} ({total / 1e6:.2f}M parameters) on {device}; training {trainable:,} "
         f"({'full fine-tuning' if config.lora.full_finetune else f'LoRA r={spec.r} alpha={spec.alpha:g} on {len(lora.lora_layers(model))} modules'})")

    # --- data ------------------------------------------------------------------------------
    train_set, report = encode_split(splits.train, splits, tokenizer, config.data)
    valid_set = encode_split(splits.valid, splits, tokenizer, config.data, for_eval=True)[0] if splits.valid else []
    echo(f"data {splits.source}: {len(splits.train)} train / {len(splits.valid)} valid / {len(splits.test)} test rows; "
         f"template {describe_template(splits.template, tokenizer)}; {report.summary()}")
    echo(f"run folder: {run.folder}")
    pad_id = pad_id_of(tokenizer)
    answer_ids = answer_ids_for(tokenizer, splits, ec.answers)
    total_steps = count_steps(tc, len(train_set))

    # --- optimizer ---------------------------------------------------------------------------
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = MLXAdamW(list(named.values()), lr=tc.learning_rate, weight_decay=tc.weight_decay,
                         bias_correction=tc.bias_correction)
    step, best, stale = 0, None, 0
    if resume:
        step, best, stale = checkpoint.load(run, model, optimizer, named, config.lora.full_finetune,
                                             config.model.trust_remote_code)
        run.truncate_log(step)
        echo(f"resumed {run.folder} at step {step}")

    def validate() -> dict:
        if not valid_set:
            return {}
        result = evaluate(model, valid_set, pad_id=pad_id, split_head=split_head, batch_size=ec.batch_size,
                          answer_ids=answer_ids)
        result.pop("probabilities", None)
        return {f"eval_{k}": v for k, v in result.items()}

    summary_path = run.folder / "summary.json"
    before = json.loads(summary_path.read_text())["before"] if resume and summary_path.exists() else validate()
    if not resume:
        run.write_summary({"before": before})
    if before:
        echo("before training: " + describe(before, "eval_"))

    # --- loop ----------------------------------------------------------------------------------
    batches = batch_stream(train_set, tc, pad_id, skip=step * tc.grad_accumulation, pad_to_multiple=PAD_MULTIPLE)
    progress = Progress(total_steps, initial=step)
    model.train()
    window = {"loss": 0.0, "scored": 0.0, "tokens": 0, "start": time.perf_counter()}
    trained_tokens = sum(r.get("trained_tokens", 0) for r in run.metrics()[-1:]) if resume else 0
    torch_model.reset_peak_memory(device)
    stopped_early = False
    while step < total_steps:
        torch.manual_seed(tc.seed * 1_000_003 + step)  # dropout noise is a function of the step: resume-exact
        optimizer.zero_grad(set_to_none=True)
        step_loss, step_scored = torch.zeros((), device=device), 0.0
        for _ in range(tc.grad_accumulation):
            batch, epoch = next(batches)
            loss_sum, n_tokens = micro_step(model, batch, split_head, device)
            step_loss, step_scored = step_loss + loss_sum, step_scored + n_tokens
            window["tokens"] += batch.tokens
            trained_tokens += batch.tokens
        rate = learning_rate(step, peak=tc.learning_rate, total_steps=total_steps, warmup_steps=tc.warmup_steps,
                             schedule=tc.schedule, minimum=tc.min_learning_rate)
        grad_norm = update(optimizer, step_scored, rate, tc.max_grad_norm)
        step += 1
        step_loss = step_loss.item()  # one device sync per step
        window["loss"] += step_loss
        window["scored"] += step_scored
        progress.update(loss=step_loss / step_scored)

        evaluate_now = ec.every and step % ec.every == 0 and step < total_steps
        if step % tc.report_every == 0 or step == total_steps or evaluate_now:
            elapsed = time.perf_counter() - window["start"]
            tokens_per_second = window["tokens"] / elapsed
            record = {"step": step, "epoch": round(epoch, 3), "loss": window["loss"] / window["scored"],
                      "learning_rate": rate, "grad_norm": grad_norm, "tokens_per_second": tokens_per_second,
                      "trained_tokens": trained_tokens, "peak_memory_gb": torch_model.peak_memory_gb(device)}
            if evaluate_now:
                record.update(validate())
                best, stale, improved = track_best(record, best, stale, ec.metric)
                if improved:
                    checkpoint.save_weights(run.folder / "best", model, spec, config, folder)
            run.log(record)
            progress.set_rate(tokens_per_second)
            progress.report(f"step {step}/{total_steps}: " + describe({k: v for k, v in record.items() if k != "step"}))
            window = {"loss": 0.0, "scored": 0.0, "tokens": 0, "start": time.perf_counter()}
            if ec.patience and stale >= ec.patience:
                echo(f"early stop at step {step}: no better eval_{ec.metric} for {stale} evaluations")
                stopped_early = True
        if step % tc.checkpoint_every == 0 or stopped_early:
            checkpoint.save(run, model, optimizer, named, spec, config, folder, step, best, stale)
        if stopped_early:
            break
    progress.close()

    # --- save ----------------------------------------------------------------------------------
    after = validate()
    if after:
        echo("after training:  " + describe(after, "eval_"))
        final = {"step": step, **after}
        best, stale, improved = track_best(final, best, stale, ec.metric)
        if improved:
            checkpoint.save_weights(run.folder / "best", model, spec, config, folder)
    checkpoint.save_weights(run.folder / "last", model, spec, config, folder)
    saved_check = None if config.lora.full_finetune else check_saved_adapter(
        lora, model, run.folder / "last", probe_ids(valid_set or train_set), echo)
    generations = answer_held_out(generate_answer, model, tokenizer, splits, config) if ec.generate_examples else []
    history = run.metrics()
    summary = {
        "recipe": config.recipe,
        "backend": "torch",
        "device": str(device),
        "model": str(folder),
        "steps": step,
        "stopped_early": stopped_early,
        "trainable_parameters": trainable,
        "train_rows": len(train_set),
        "truncated_rows": report.truncated,
        "before": before,
        "after": after,
        "best": best,
        "final_loss": history[-1]["loss"] if history else None,
        "tokens_per_second": mean_rate(history),
        "trained_tokens": trained_tokens,
        "peak_memory_gb": max((r["peak_memory_gb"] for r in history), default=torch_model.peak_memory_gb(device)),
        "adapter": str(run.folder / "best" if (run.folder / "best").exists() else run.folder / "last"),
        "saved_check": saved_check,
        "generations": generations,
    }
    run.write_summary(summary)
    return summary


# --- pieces --------------------------------------------------------------------------------------

def micro_step(model, batch, split_head: bool, device) -> tuple[torch.Tensor, float]:
    """Forward and backward of one micro-batch. Adds the gradient of its loss *sum* to .grad, so
    micro-batches add up to one big batch; returns (loss sum, detached; scored tokens)."""
    targets = scored_targets(batch)
    inputs, positions, tokens, weights = torch_model.to_device(device, batch.input_ids[:, :-1], targets.positions,
                                                               targets.tokens, targets.weights)
    with torch_model.autocast(device):
        loss_sum, _ = torch_model.token_losses(model, inputs, positions, tokens, weights, split_head)
    loss_sum.backward()
    return loss_sum.detach(), float(targets.weights.sum())


def update(optimizer, n_tokens: float, rate: float, max_grad_norm: float | None) -> float:
    """Gradient sums / all scored tokens of the step, clipped (MLX's formula: scale by
    min(1, max_norm / (norm + 1e-6))), then one AdamW step at `rate`. Returns the norm before clipping."""
    parameters = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    for p in parameters:
        p.grad.div_(n_tokens)
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_grad_norm or float("inf"))
    for group in optimizer.param_groups:
        group["lr"] = rate
    optimizer.step()
    return norm.item()
