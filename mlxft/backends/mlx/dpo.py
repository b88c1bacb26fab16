"""Direct preference optimisation (DPO) on MLX, with the reference model for free. Reads top to
bottom: setup -> reference -> policy -> data -> optimizer -> loop -> save -> before/after answers.

    mlxft dpo --recipe dpo                                       # built-in model, bundled preference sample
    mlxft dpo --recipe dpo --model mlx-community/Qwen2.5-0.5B-Instruct-4bit --data pairs.jsonl
    mlxft dpo --recipe dpo --adapter runs/sft/best               # continue an SFT adapter; it is the reference
    mlxft dpo --recipe dpo --data data/opposing-sample.json --set dpo.support_ratio=0.5 \
        --set dpo.compare_prompts=data/opposing-test.json

The reference model is never a second copy of the weights:
- a new adapter: the reference is the base model, i.e. this very model with its LoRA layers
  switched off (`adapter_off`: each layer's scale 0 and dropout off for one forward, the result
  under stop_gradient). It runs as its own compiled function, evaluated before the policy's step.
  mx.compile reads Python attributes such as `scale` and `training` while tracing and bakes them
  into the trace, so the reference trace has the adapter off and the step's trace has it on;
  switching them back after the trace is what keeps the step's trace right, and neither trace
  reads them again. No gradient flows into the reference, and its activations are gone before
  the policy's forward starts;
- `dpo.precompute_reference`: the same log-probs, once for the train and validation pairs
  before training, cached in the run folder (reference_logps.safetensors, reused on --resume):
  no reference forward per step;
- `--adapter DIR` (continue an SFT adapter), `dpo.reference_adapter`, or full fine-tuning: the
  reference is base + that adapter (or the initial weights). The trained weights sit where the
  reference's are, so there is nothing to switch off: the reference is always precomputed.

One forward per step runs chosen and rejected together, and each prompt once: one [prompt |
chosen | rejected] row per pair, the rejected answer at the chosen one's positions and masked from
it (mlxft.data.shared_prompt; `dpo.share_prompt`, on by default: the same loss with ~30% fewer
tokens on the bundled pairs). Model families it does not know, and gradient checkpointing, run
the 2B rows [prompt + chosen; prompt + rejected] instead. Only answer tokens are scored, through
the LM head at those positions.

Supports: sigmoid (with label smoothing), IPO, hinge and robust losses (mlxft.dpo_loss, shared
with the PyTorch backend); summed or averaged answer log-probs; LoRA (QLoRA on quantized bases)
or full fine-tuning; AdamW with warmup and cosine / linear / constant decay; gradient
accumulation weighted by pairs (k micro-batches give exactly the gradient of one batch k times
the size); clipping; steps or epochs; validation every N steps with the best adapter kept and
early stopping; atomic checkpoints and --resume that reproduces an uninterrupted run's losses;
metrics.jsonl with TRL's names (rewards/chosen, rewards/rejected, rewards/accuracies,
rewards/margins, logps/*, logits/*; eval_ for validation); summary.json; a progress bar; and
answers of the model before and after training, side by side (comparison.json, comparison.md).

Raises UserError for bad recipes, data, models and adapters (see mlxft.errors).
"""

from __future__ import annotations

import json
import time
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
from mlx.utils import tree_map

from mlxft.adapters import AdapterSpec, load_adapter
from mlxft.backends.mlx import PAD_MULTIPLE, SHARED_PROMPT_FEW_WIDTHS, SHARED_PROMPT_PAD_MULTIPLE, checkpoint, lora
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx.generate import generate_answer
from mlxft.backends.mlx.model import logits_at, shared_prompt_logits
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_pair_batches
from mlxft.data.dataset import load_preference_splits, prompt_records, resolve_source
from mlxft.data.records import load_records
from mlxft.data.shared_prompt import pair_inputs
from mlxft.dpo_common import (
    answer_all,
    cached_reference,
    compare_rows,
    encode_pairs,
    prepare_reference,
    write_comparison,
)
from mlxft.dpo_loss import dpo_losses, pair_statistics, summarize, uses_mean_logps
from mlxft.errors import UserError
from mlxft.model_files import BUILTIN
from mlxft.model_files import pad_id as pad_id_of
from mlxft.progress import Progress
from mlxft.runs import Run
from mlxft.saved_check import check_saved_adapter, probe_ids
from mlxft.schedule import learning_rate
from mlxft.training import batch_stream, count_steps, describe, mean_rate, track_best


def train(config: RunConfig, run: Run, *, resume: bool = False, adapter: str | None = None, echo=print) -> dict:
    """Train as `config` says, writing into `run`; returns the summary (also in summary.json)."""
    tc, ec, dc = config.train, config.eval, config.dpo

    # --- setup -----------------------------------------------------------------------------
    dc.check()
    mx.random.seed(tc.seed)
    mlx_model.configure_memory()
    splits = load_preference_splits(config.data, dc.support_ratio)  # rows first: a data mistake should not wait for a model
    asked = prompt_records(load_records(resolve_source(dc.compare_prompts))) if dc.compare_prompts else None
    if adapter and config.lora.full_finetune:
        raise UserError("--adapter continues a LoRA adapter; drop it, or lora.full_finetune")
    if dc.reference_adapter:
        load_adapter(dc.reference_adapter)  # a bad path fails now, not after the data is encoded

    model, tokenizer, folder = mlx_model.load(config.model.name, quantize=config.model.quantize,
                                              trust_remote_code=config.model.trust_remote_code)
    split_head = mlx_model.can_split_head(model, folder)
    pad_id = pad_id_of(tokenizer)
    # Not with gradient checkpointing: mlx-lm's recomputes each block during the backward pass,
    # after the forward has put back the rotary embeddings the shared layout swaps for its length.
    shared = dc.share_prompt and mlx_model.can_share_prompts(model, folder) and not tc.grad_checkpoint

    def arrays_of(pairs) -> dict:
        return batch_arrays(pairs.batch, pad_id, shared)

    train_set, valid_set, truncated_pairs = encode_pairs(splits, tokenizer, config, echo)

    # --- reference ---------------------------------------------------------------------------
    cache, reference_name = prepare_reference(
        run, config, adapter=adapter, model_folder=folder, train_set=train_set, valid_set=valid_set, resume=resume,
        score=lambda pairs: _score_pairs(model, pairs, arrays_of, pad_id, split_head, ec.batch_size),
        carry_adapter=lambda path: lora.load_adapter_weights(model, *load_adapter(path), path),
        drop_adapter=lambda: lora.remove_lora(model), echo=echo)

    # --- policy ----------------------------------------------------------------------------
    base_name = str(folder) if config.model.name == BUILTIN else config.model.name
    spec = AdapterSpec(config.lora.r, config.lora.alpha, config.lora.dropout, list(config.lora.target_modules),
                       base_name, config.lora.layers)
    mx.random.seed(tc.seed)  # a new adapter's A is the same whether or not the reference was scored first
    start_from = run.checkpoint_dir / "weights" if resume else adapter
    if config.lora.full_finetune:
        if config.model.quantize or any(isinstance(m, nn.QuantizedLinear) for _, m in model.named_modules()):
            raise UserError("full fine-tuning needs a full-precision model; use LoRA on a quantized one")
        model.unfreeze()
        if resume:
            model.load_weights(list(mx.load(str(start_from / "model.safetensors")).items()))
    elif start_from:
        spec, weights = load_adapter(start_from)
        lora.load_adapter_weights(model, spec, weights, str(start_from))
        for layer in lora.lora_layers(model).values():
            layer.unfreeze(keys=["lora_a", "lora_b"], strict=False)
            layer.linear.freeze()
    else:
        lora.apply_lora(model, spec)
    if tc.grad_checkpoint:
        from mlx_lm.tuner.trainer import grad_checkpoint

        if spec.dropout and not config.lora.full_finetune:
            # As in sft.py: the recomputed forward would draw another dropout mask than the loss saw.
            raise UserError("train.grad_checkpoint needs lora.dropout=0: the recomputed forward pass would draw another dropout mask")
        grad_checkpoint(model.layers[0])  # patches the block class: recompute activations in backward
    trainable, total = lora.trainable_parameters(model), lora.total_parameters(model)
    echo(f"model {folder} ({total / 1e6:.2f}M parameters); training {trainable:,} "
         f"({'full fine-tuning' if config.lora.full_finetune else f'LoRA r={spec.r} alpha={spec.alpha:g} on {len(lora.lora_layers(model))} modules'})"
         f"; DPO {dc.loss_type}, beta {dc.beta:g}; reference: {reference_name}"
         f"; {'each prompt run once' if shared else 'prompts run with each answer'}")
    echo(f"run folder: {run.folder}")
    total_steps = count_steps(tc, len(train_set))

    # --- optimizer ---------------------------------------------------------------------------
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
                            bias_correction=tc.bias_correction)
    step, best, stale = 0, None, 0
    if resume:  # before the step is compiled: it must capture the restored optimizer state
        step, best, stale = checkpoint.load_optimizer(run, model, optimizer)  # the weights came in above
        run.truncate_log(step)
        echo(f"resumed {run.folder} at step {step}")
    state = [model.state, optimizer.state, mx.random.state]
    micro_step, update = make_step(model, optimizer, split_head, tc.max_grad_norm, dc)
    reference_step = None if cache is not None else make_reference_step(model, split_head)

    def reference_for(pairs, split: str, arrays):
        """Reference log-prob sums [2B] of a pair batch, in its row order (chosen, then rejected)."""
        if cache is not None:
            return mx.array(cached_reference(cache, split, pairs.index))
        return reference_step(arrays)

    def validate() -> dict:
        if not valid_set:
            return {}
        model.eval()
        sums = 0.0
        for pairs in iterate_pair_batches(valid_set, ec.batch_size, pad_id, shuffle=False, pad_to_multiple=PAD_MULTIPLE):
            arrays = arrays_of(pairs)
            reference = reference_for(pairs, "valid", arrays)
            sums = sums + np.array(pair_loss(model, arrays, reference, split_head=split_head, dc=dc)[1])
        model.train()
        return {f"eval_{k}": v for k, v in summarize(sums).items()}

    summary_path = run.folder / "summary.json"
    earlier = json.loads(summary_path.read_text()) if resume and summary_path.exists() else None
    before = earlier["before"] if earlier else validate()
    prompts = compare_rows(asked, splits, ec)
    before_answers = earlier.get("before_answers", []) if earlier else answer_all(generate_answer, model, tokenizer, prompts, splits, config)
    if not resume:
        run.write_summary({"before": before, "before_answers": before_answers})
    if before:
        echo("before training: " + describe(before, "eval_"))

    # --- loop ----------------------------------------------------------------------------------
    batches = batch_stream(train_set, tc, pad_id, skip=step * tc.grad_accumulation, pad_to_multiple=PAD_MULTIPLE,
                           iterate=iterate_pair_batches)
    progress = Progress(total_steps, initial=step)
    model.train()
    window = {"sums": 0.0, "tokens": 0, "start": time.perf_counter()}
    trained_tokens = sum(r.get("trained_tokens", 0) for r in run.metrics()[-1:]) if resume else 0
    mx.reset_peak_memory()
    stopped_early = False
    while step < total_steps:
        mx.random.seed(tc.seed * 1_000_003 + step)  # dropout noise is a function of the step: resume-exact
        grads, step_sums = None, None
        for _ in range(tc.grad_accumulation):
            pairs, epoch = next(batches)
            arrays = arrays_of(pairs)
            reference = reference_for(pairs, "train", arrays)
            mx.eval(reference)  # the reference forward's activations are freed before the policy's begins
            micro_grads, sums = micro_step(arrays, reference)
            grads = micro_grads if grads is None else tree_map(mx.add, grads, micro_grads)
            step_sums = sums if step_sums is None else step_sums + sums
            window["tokens"] += pairs.tokens
            trained_tokens += pairs.tokens
        optimizer.learning_rate = learning_rate(step, peak=tc.learning_rate, total_steps=total_steps,
                                                warmup_steps=tc.warmup_steps, schedule=tc.schedule,
                                                minimum=tc.min_learning_rate)
        grad_norm = update(grads, step_sums[0])
        mx.eval(state, step_sums, grad_norm)
        mlx_model.trim_cache()
        step += 1
        step_sums = np.array(step_sums)
        window["sums"] = window["sums"] + step_sums
        progress.update(loss=float(step_sums[1] / step_sums[0]))

        evaluate_now = ec.every and step % ec.every == 0 and step < total_steps
        if step % tc.report_every == 0 or step == total_steps or evaluate_now:
            elapsed = time.perf_counter() - window["start"]
            tokens_per_second = window["tokens"] / elapsed
            trained = summarize(window["sums"])
            record = {"step": step, "epoch": round(epoch, 3), "loss": trained.pop("loss"),
                      "learning_rate": float(optimizer.learning_rate.item()), "grad_norm": grad_norm.item(),
                      "tokens_per_second": tokens_per_second, "trained_tokens": trained_tokens,
                      "peak_memory_gb": mlx_model.peak_memory_gb(), **trained}
            if evaluate_now:
                record.update(validate())
                best, stale, improved = track_best(record, best, stale, ec.metric)
                if improved:
                    checkpoint.save_weights(run.folder / "best", model, spec, config, folder)
            run.log(record)
            progress.set_rate(tokens_per_second)
            progress.report(f"step {step}/{total_steps}: " + describe({k: v for k, v in record.items() if k != "step"}))
            window = {"sums": 0.0, "tokens": 0, "start": time.perf_counter()}
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
        best, stale, improved = track_best({"step": step, **after}, best, stale, ec.metric)
        if improved:
            checkpoint.save_weights(run.folder / "best", model, spec, config, folder)
    checkpoint.save_weights(run.folder / "last", model, spec, config, folder)
    saved_check = None if config.lora.full_finetune else check_saved_adapter(
        lora, model, run.folder / "last", probe_ids(valid_set or train_set), echo)

    # --- before / after answers ----------------------------------------------------------------
    comparison = None
    if prompts:
        after_answers = answer_all(generate_answer, model, tokenizer, prompts, splits, config)
        comparison = write_comparison(run.folder, prompts, before_answers, after_answers, config, adapter, step)
    history = run.metrics()
    summary = {
        "recipe": config.recipe,
        "method": "dpo",
        "backend": "mlx",
        "device": str(mx.default_device()),
        "model": str(folder),
        "reference": reference_name,
        "loss_type": dc.loss_type,
        "beta": dc.beta,
        "steps": step,
        "stopped_early": stopped_early,
        "trainable_parameters": trainable,
        "train_pairs": len(train_set),
        "valid_pairs": len(valid_set),
        "truncated_pairs": truncated_pairs,
        "shared_prompts": shared,
        "before": before,
        "after": after,
        "best": best,
        "final_loss": history[-1]["loss"] if history else None,
        "tokens_per_second": mean_rate(history),
        "trained_tokens": trained_tokens,
        "peak_memory_gb": max((r["peak_memory_gb"] for r in history), default=mlx_model.peak_memory_gb()),
        "adapter": str(run.folder / "best" if (run.folder / "best").exists() else run.folder / "last"),
        "saved_check": saved_check,
        "before_answers": before_answers,
        "comparison": comparison,
    }
    run.write_summary(summary)
    return summary


# --- the step ------------------------------------------------------------------------------------

def sequence_logps(model, arrays: dict, split_head: bool):
    """Per row of a pair batch (chosen rows, then rejected): (sum of the answer tokens'
    log-probs, sum over the answer tokens of the mean logit over the vocabulary, answer tokens).
    `arrays` is either layout of mlxft.data.shared_prompt.pair_inputs."""
    if "mask" in arrays:
        logits = shared_prompt_logits(model, arrays["prompt_ids"], arrays["answer_ids"], arrays["mask"])
        tokens = arrays["answer_ids"]
    else:
        logits = logits_at(model, arrays["inputs"], arrays["positions"], split_head)
        tokens = arrays["tokens"]
    logits, weights = logits.astype(mx.float32), arrays["weights"]
    token_logps = -nn.losses.cross_entropy(logits, tokens) * weights
    return token_logps.sum(-1), (logits.mean(-1) * weights).sum(-1), weights.sum(-1)


def pair_loss(model, arrays: dict, reference, *, split_head: bool, dc):
    """(sum of the DPO losses of the batch's pairs, STATISTICS sums) given reference log-prob sums."""
    logps, logit_sums, counts = sequence_logps(model, arrays, split_head)
    if uses_mean_logps(dc.loss_type, dc.average_log_prob):
        logps, reference = logps / counts, reference / counts
    b = logps.shape[0] // 2
    losses, chosen_rewards, rejected_rewards = dpo_losses(logps[:b], logps[b:], reference[:b], reference[b:], beta=dc.beta,
                                                          loss_type=dc.loss_type, label_smoothing=dc.label_smoothing, xp=mx)
    sums = pair_statistics(*map(mx.stop_gradient, (losses, chosen_rewards, rejected_rewards, logps[:b], logps[b:], logit_sums)),
                           counts, xp=mx)
    return losses.sum(), sums


def make_step(model, optimizer, split_head: bool, max_grad_norm: float | None, dc):
    """The compiled pieces of an optimizer step, with the state they read and write named:
    micro_step(arrays, reference) -> (gradient sums, STATISTICS sums), arrays as pair_inputs makes them
    update(gradient sums, pairs) -> gradient norm (before clipping); applies AdamW."""
    loss_and_grad = nn.value_and_grad(model, partial(pair_loss, split_head=split_head, dc=dc))
    state = [model.state, optimizer.state, mx.random.state]

    @partial(mx.compile, inputs=state, outputs=state)
    def micro_step(arrays, reference):
        (_, sums), grads = loss_and_grad(model, arrays, reference)
        return grads, sums

    @partial(mx.compile, inputs=state, outputs=state)
    def update(grads, pairs):
        # Sum of pair losses / all pairs of the step: one big batch, whatever k is.
        grads = tree_map(lambda g: g / pairs, grads)
        grads, norm = optim.clip_grad_norm(grads, max_grad_norm or float("inf"))
        optimizer.update(model, grads)
        return norm

    return micro_step, update


def make_reference_step(model, split_head: bool):
    """Compiled: reference log-prob sums [2B] of a pair batch, from the base model (adapter off)."""

    @partial(mx.compile, inputs=[model.state])
    def reference_step(arrays):
        with lora.adapter_off(model):
            logps = sequence_logps(model, arrays, split_head)[0]
        return mx.stop_gradient(logps)

    return reference_step


def batch_arrays(batch, pad_id: int, shared: bool, pad_to_multiple: int | None = None) -> dict:
    """A pair batch's rows as the step takes them (mlxft.data.shared_prompt.pair_inputs)."""
    multiple = pad_to_multiple or (SHARED_PROMPT_PAD_MULTIPLE if shared else PAD_MULTIPLE)
    arrays = pair_inputs(batch, pad_id, shared=shared, pad_to_multiple=multiple, few_widths=SHARED_PROMPT_FEW_WIDTHS)
    return {k: mx.array(v) for k, v in arrays.items()}


# --- the cached reference --------------------------------------------------------------------------

def _score_pairs(model, pairs, arrays_of, pad_id: int, split_head: bool, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob sums of every pair's chosen and rejected answer under the model as it is now."""
    chosen, rejected = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
    was_training = model.training
    model.eval()
    for batch in iterate_pair_batches(pairs, batch_size, pad_id, shuffle=False, pad_to_multiple=PAD_MULTIPLE):
        logps = np.array(mx.stop_gradient(sequence_logps(model, arrays_of(batch), split_head)[0]))
        chosen[batch.index], rejected[batch.index] = logps[: batch.pairs], logps[batch.pairs :]
    model.train(was_training)
    return chosen, rejected
