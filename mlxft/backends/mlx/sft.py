"""Supervised fine-tuning (LoRA or full) on MLX. Reads top to bottom: setup -> model -> data ->
optimizer -> loop -> save.

    mlxft lora --recipe tallrec                 # the built-in model on the bundled MIND sample
    mlxft lora --recipe tallrec --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --data MINDsmall_train

Supports: LoRA in PEFT terms or full fine-tuning; quantized bases (QLoRA); AdamW with warmup and
cosine / linear / constant decay; gradient accumulation weighted by scored tokens (k micro-batches
give exactly the gradient of one batch k times the size); gradient clipping; steps or epochs;
length-grouped batches; the LM head run on scored positions only; a compiled step; gradient
checkpointing; validation loss (and AUC for Yes/No data) every N steps with the best adapter kept
and early stopping; atomic checkpoints every N steps and --resume that reproduces the losses of an
uninterrupted run; metrics.jsonl, summary.json and a progress bar with loss and tokens/s.

Raises UserError for bad recipes, data, models and adapters (see mlxft.errors).
"""

from __future__ import annotations

import json
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
from mlx.utils import tree_map

from mlxft.adapters import AdapterSpec, load_adapter
from mlxft.backends.mlx import PAD_MULTIPLE, checkpoint, lora
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx.evaluate import evaluate
from mlxft.backends.mlx.generate import generate_answer
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
    mx.random.seed(tc.seed)
    mlx_model.configure_memory()

    splits = load_splits(config.data)  # rows first: a data mistake should not wait for a model to load

    # --- model -----------------------------------------------------------------------------
    model, tokenizer, folder = mlx_model.load(config.model.name, quantize=config.model.quantize,
                                              trust_remote_code=config.model.trust_remote_code)
    split_head = mlx_model.can_split_head(model, folder)
    base_name = str(folder) if config.model.name == BUILTIN else config.model.name
    spec = AdapterSpec(config.lora.r, config.lora.alpha, config.lora.dropout, list(config.lora.target_modules),
                       base_name, config.lora.layers)
    if resume and not config.lora.full_finetune:
        # A run that continued another adapter trains that adapter's modules, not the recipe's.
        spec = load_adapter(run.checkpoint_dir / "weights")[0]
    if config.lora.full_finetune:
        if config.model.quantize or any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise UserError("full fine-tuning needs a full-precision model; use LoRA on a quantized one")
        model.unfreeze()
    elif adapter:
        spec, weights = load_adapter(adapter)  # continue an existing adapter (TALLRec starts from Alpaca's)
        lora.load_adapter_weights(model, spec, weights, adapter)
        for layer in lora.lora_layers(model).values():
            layer.unfreeze(keys=["lora_a", "lora_b"], strict=False)
            layer.linear.freeze()
    else:
        lora.apply_lora(model, spec)
    if tc.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        if config.lora.dropout and not config.lora.full_finetune:
            # The backward pass recomputes each block's forward and would draw a second dropout
            # mask, unrelated to the one the loss saw: the gradients would be silently wrong
            # (measured: a 2% different gradient norm on the first step).
            raise UserError("train.grad_checkpoint needs lora.dropout=0: the recomputed forward pass would draw another dropout mask")

        grad_checkpoint(model.layers[0])  # patches the block class: recompute activations in backward
    trainable, total = lora.trainable_parameters(model), lora.total_parameters(model)
    echo(f"model {folder} ({total / 1e6:.2f}M parameters); training {trainable:,} "
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
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
                            bias_correction=tc.bias_correction)
    step, best, stale = 0, None, 0
    if resume:  # before the step is compiled: it must capture the restored optimizer state
        step, best, stale = checkpoint.load(run, model, optimizer, config.lora.full_finetune)
        run.truncate_log(step)
        echo(f"resumed {run.folder} at step {step}")
    state = [model.state, optimizer.state, mx.random.state]
    micro_step, update = make_step(model, optimizer, split_head, tc.max_grad_norm)

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
    mx.reset_peak_memory()
    stopped_early = False
    while step < total_steps:
        mx.random.seed(tc.seed * 1_000_003 + step)  # dropout noise is a function of the step: resume-exact
        grads, step_loss, step_scored = None, mx.array(0.0), mx.array(0.0)
        for _ in range(tc.grad_accumulation):
            batch, epoch = next(batches)
            targets = scored_targets(batch)
            loss_sum, n_tokens, micro_grads = micro_step(
                mx.array(batch.input_ids[:, :-1]), mx.array(targets.positions), mx.array(targets.tokens),
                mx.array(targets.weights))
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            step_loss, step_scored = step_loss + loss_sum, step_scored + n_tokens
            window["tokens"] += batch.tokens
            trained_tokens += batch.tokens
        optimizer.learning_rate = learning_rate(step, peak=tc.learning_rate, total_steps=total_steps,
                                                warmup_steps=tc.warmup_steps, schedule=tc.schedule,
                                                minimum=tc.min_learning_rate)
        grad_norm = update(grads, step_scored)
        mx.eval(state, step_loss, step_scored, grad_norm)
        mlx_model.trim_cache()
        step += 1
        window["loss"] += step_loss.item()
        window["scored"] += step_scored.item()
        progress.update(loss=step_loss.item() / step_scored.item())

        evaluate_now = ec.every and step % ec.every == 0 and step < total_steps
        if step % tc.report_every == 0 or step == total_steps or evaluate_now:
            elapsed = time.perf_counter() - window["start"]
            tokens_per_second = window["tokens"] / elapsed
            record = {"step": step, "epoch": round(epoch, 3), "loss": window["loss"] / window["scored"],
                      "learning_rate": float(optimizer.learning_rate.item()), "grad_norm": grad_norm.item(),
                      "tokens_per_second": tokens_per_second, "trained_tokens": trained_tokens,
                      "peak_memory_gb": mlx_model.peak_memory_gb()}
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
            checkpoint.save(run, model, optimizer, spec, config, folder, step, best, stale)
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
        "backend": "mlx",
        "device": str(mx.default_device()),
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
        "peak_memory_gb": max((r["peak_memory_gb"] for r in history), default=mlx_model.peak_memory_gb()),
        "adapter": str(run.folder / "best" if (run.folder / "best").exists() else run.folder / "last"),
        "saved_check": saved_check,
        "generations": generations,
    }
    run.write_summary(summary)
    return summary


# --- pieces --------------------------------------------------------------------------------------

def make_step(model, optimizer, split_head: bool, max_grad_norm: float | None):
    """The compiled pieces of an optimizer step, with the state they read and write named:
    micro_step(inputs, positions, tokens, weights) -> (loss sum, scored tokens, gradient sums)
    update(gradient sums, scored tokens) -> gradient norm (before clipping); applies AdamW."""
    loss_and_grad = nn.value_and_grad(model, partial(mlx_model.token_losses, split_head=split_head))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(inputs, positions, tokens, weights):
        (loss_sum, n_tokens), grads = loss_and_grad(model, inputs, positions, tokens, weights)
        return loss_sum, n_tokens, grads

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads, n_tokens):
        # Sum of token losses / all scored tokens of the step: one big batch, whatever k is.
        grads = tree_map(lambda g: g / n_tokens, grads)
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm or float("inf"))
        optimizer.update(model, grads)
        return norm

    return micro_step, update
