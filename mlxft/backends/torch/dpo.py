"""Direct preference optimisation (DPO) on PyTorch (CUDA, MPS or CPU), with the reference model
for free. The twin of mlxft.backends.mlx.dpo: same recipes, same losses, same metric names, same
run folder and summary.json keys. Reads top to bottom: setup -> reference -> policy -> optimizer
-> loop -> save -> before/after answers.

    mlxft dpo --recipe dpo --backend torch
    mlxft dpo --recipe dpo --backend torch --model Qwen/Qwen2.5-0.5B-Instruct --data pairs.jsonl
    mlxft dpo --recipe dpo --backend torch --adapter runs/sft/best   # continue an SFT adapter; it is the reference

The reference model is never a second copy of the weights:
- a new adapter: the reference is the base model, i.e. this very model with its LoRA layers
  switched off (`adapter_off`: what PEFT's `with model.disable_adapter():` does, on the layers
  mlxft injected, plus dropout off), run under torch.no_grad() before the policy's forward. No
  gradient flows into it and none of its activations are kept;
- `dpo.precompute_reference`: the same log-probs, once for the train and validation pairs
  before training, cached in the run folder (reference_logps.safetensors, the MLX trainer's file
  and check, reused on --resume): no reference forward per step;
- `--adapter DIR` (continue an SFT adapter), `dpo.reference_adapter`, or full fine-tuning: the
  reference is base + that adapter (or the initial weights), always precomputed, as on MLX.

One forward per step runs chosen and rejected together, and each prompt once: one [prompt |
chosen | rejected] row per pair, the rejected answer at the chosen one's positions and masked from
it (mlxft.data.shared_prompt; `dpo.share_prompt`, on by default, as on MLX). Model families it
does not know, and attention that takes no custom mask, run the 2B rows [prompt + chosen; prompt
+ rejected] instead. Only answer tokens are scored, through the LM head at those positions.

Supports: sigmoid (with label smoothing), IPO, hinge and robust losses (mlxft.dpo_loss, the same
functions as on MLX); summed or averaged answer log-probs; LoRA through PEFT (QLoRA through
bitsandbytes on CUDA) or full fine-tuning; MLX's AdamW update (adamw.py) with warmup and cosine /
linear / constant decay; gradient accumulation weighted by pairs (k micro-batches give exactly
the gradient of one batch k times the size); clipping; steps or epochs; bf16 autocast on CUDA;
gradient checkpointing; validation every N steps with the best adapter kept and early stopping;
atomic checkpoints and --resume that reproduces an uninterrupted run's losses; metrics.jsonl with
TRL's names (rewards/*, logps/*, logits/*; eval_ for validation); summary.json; a progress bar;
and answers before and after training, side by side (comparison.json, comparison.md).

Raises UserError for bad recipes, data, models and adapters, for --quantize without CUDA, and
for resuming a run another backend wrote.
"""

from __future__ import annotations

import json
import time

import numpy as np
import torch
import torch.nn.functional as F

from mlxft.adapters import AdapterSpec, load_adapter
from mlxft.backends.torch import PAD_MULTIPLE, SHARED_PROMPT_FEW_WIDTHS, SHARED_PROMPT_PAD_MULTIPLE, checkpoint, lora
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.backends.torch.generate import generate_answer
from mlxft.backends.torch.model import logits_at, shared_prompt_logits
from mlxft.backends.torch.sft import update
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
    device = torch_model.pick_device()
    splits = load_preference_splits(config.data, dc.support_ratio)  # rows first: a data mistake should not wait for a model
    asked = prompt_records(load_records(resolve_source(dc.compare_prompts))) if dc.compare_prompts else None
    if adapter and config.lora.full_finetune:
        raise UserError("--adapter continues a LoRA adapter; drop it, or lora.full_finetune")
    if dc.reference_adapter:
        load_adapter(dc.reference_adapter)  # a bad path fails now, not after the data is encoded

    model, tokenizer, folder = torch_model.load(config.model.name, quantize=config.model.quantize,
                                                trust_remote_code=config.model.trust_remote_code, device=device)
    split_head = torch_model.can_split_head(model, folder)
    pad_id = pad_id_of(tokenizer)
    shared = dc.share_prompt and torch_model.can_share_prompts(model, folder)

    def tensors_of(pairs) -> dict:
        return batch_tensors(pairs.batch, pad_id, shared, device)

    train_set, valid_set, truncated_pairs = encode_pairs(splits, tokenizer, config, echo)

    # --- reference ---------------------------------------------------------------------------
    cache, reference_name = prepare_reference(
        run, config, adapter=adapter, model_folder=folder, train_set=train_set, valid_set=valid_set, resume=resume,
        score=lambda pairs: _score_pairs(model, pairs, tensors_of, pad_id, split_head, ec.batch_size, device),
        carry_adapter=lambda path: lora.load_adapter_weights(model, *load_adapter(path), path),
        drop_adapter=lambda: lora.remove_lora(model), echo=echo)

    # --- policy ----------------------------------------------------------------------------
    base_name = str(folder) if config.model.name == BUILTIN else config.model.name
    spec = AdapterSpec(config.lora.r, config.lora.alpha, config.lora.dropout, list(config.lora.target_modules),
                       base_name, config.lora.layers)
    torch.manual_seed(tc.seed)  # a new adapter's A is the same whether or not the reference was scored first
    start_from = run.checkpoint_dir / "weights" if resume else adapter
    if config.lora.full_finetune:
        if config.model.quantize or torch_model.is_quantized(model):
            raise UserError("full fine-tuning needs a full-precision model; use LoRA on a quantized one")
        lora.unfreeze_all(model)  # on --resume, checkpoint.load below reads the weights back
    elif start_from:
        spec, weights = load_adapter(start_from)  # the checkpoint's own spec: a continued adapter's, maybe not the recipe's
        lora.load_adapter_weights(model, spec, weights, str(start_from))
    else:
        lora.apply_lora(model, spec)
    if tc.grad_checkpoint:
        torch_model.enable_gradient_checkpointing(model)  # with LoRA dropout too: torch recomputes the same mask
    trainable, total = lora.trainable_parameters(model), lora.total_parameters(model)
    echo(f"model {folder} ({total / 1e6:.2f}M parameters) on {device}; training {trainable:,} "
         f"({'full fine-tuning' if config.lora.full_finetune else f'LoRA r={spec.r} alpha={spec.alpha:g} on {len(lora.lora_layers(model))} modules'})"
         f"; DPO {dc.loss_type}, beta {dc.beta:g}; reference: {reference_name}"
         f"; {'each prompt run once' if shared else 'prompts run with each answer'}")
    echo(f"run folder: {run.folder}")
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

    def reference_for(pairs, split: str, tensors) -> torch.Tensor:
        """Reference log-prob sums [2B] of a pair batch, in its row order (chosen, then rejected)."""
        if cache is not None:
            return torch.from_numpy(cached_reference(cache, split, pairs.index)).to(device)
        with torch_model.autocast(device):
            return reference_logps(model, tensors, split_head=split_head)

    @torch.no_grad()
    def validate() -> dict:
        if not valid_set:
            return {}
        model.eval()
        sums = 0.0
        for pairs in iterate_pair_batches(valid_set, ec.batch_size, pad_id, shuffle=False, pad_to_multiple=PAD_MULTIPLE):
            tensors = tensors_of(pairs)
            reference = reference_for(pairs, "valid", tensors)
            with torch_model.autocast(device):
                sums = sums + pair_loss(model, tensors, reference, split_head=split_head, dc=dc)[1].cpu().numpy()
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
    torch_model.reset_peak_memory(device)
    stopped_early = False
    while step < total_steps:
        torch.manual_seed(tc.seed * 1_000_003 + step)  # dropout noise is a function of the step: resume-exact
        optimizer.zero_grad(set_to_none=True)
        step_sums = None
        for _ in range(tc.grad_accumulation):
            pairs, epoch = next(batches)
            tensors = tensors_of(pairs)
            reference = reference_for(pairs, "train", tensors)  # no_grad: nothing of it is kept for the backward
            sums = micro_step(model, tensors, reference, split_head=split_head, dc=dc, device=device)
            step_sums = sums if step_sums is None else step_sums + sums
            window["tokens"] += pairs.tokens
            trained_tokens += pairs.tokens
        rate = learning_rate(step, peak=tc.learning_rate, total_steps=total_steps, warmup_steps=tc.warmup_steps,
                             schedule=tc.schedule, minimum=tc.min_learning_rate)
        step_sums = step_sums.cpu().numpy()  # one device sync per step
        grad_norm = update(optimizer, float(step_sums[0]), rate, tc.max_grad_norm)  # gradient sums / pairs of the step
        step += 1
        window["sums"] = window["sums"] + step_sums
        progress.update(loss=float(step_sums[1] / step_sums[0]))

        evaluate_now = ec.every and step % ec.every == 0 and step < total_steps
        if step % tc.report_every == 0 or step == total_steps or evaluate_now:
            elapsed = time.perf_counter() - window["start"]
            tokens_per_second = window["tokens"] / elapsed
            trained = summarize(window["sums"])
            record = {"step": step, "epoch": round(epoch, 3), "loss": trained.pop("loss"),
                      "learning_rate": rate, "grad_norm": grad_norm, "tokens_per_second": tokens_per_second,
                      "trained_tokens": trained_tokens, "peak_memory_gb": torch_model.peak_memory_gb(device), **trained}
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
            checkpoint.save(run, model, optimizer, named, spec, config, folder, step, best, stale)
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
        "backend": "torch",
        "device": str(device),
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
        "peak_memory_gb": max((r["peak_memory_gb"] for r in history), default=torch_model.peak_memory_gb(device)),
        "adapter": str(run.folder / "best" if (run.folder / "best").exists() else run.folder / "last"),
        "saved_check": saved_check,
        "before_answers": before_answers,
        "comparison": comparison,
    }
    run.write_summary(summary)
    return summary


# --- the step ------------------------------------------------------------------------------------

def sequence_logps(model, tensors: dict, split_head: bool):
    """Per row of a pair batch (chosen rows, then rejected): (sum of the answer tokens'
    log-probs, sum over the answer tokens of the mean logit over the vocabulary (detached: a
    metric), answer tokens). `tensors` is either layout of mlxft.data.shared_prompt.pair_inputs."""
    if "mask" in tensors:
        logits = shared_prompt_logits(model, tensors["prompt_ids"], tensors["answer_ids"], tensors["mask"]).float()
        tokens = tensors["answer_ids"]
    else:
        logits = logits_at(model, tensors["inputs"], tensors["positions"], split_head).float()
        tokens = tensors["tokens"]
    weights = tensors["weights"]
    token_logps = -F.cross_entropy(logits.flatten(0, 1), tokens.flatten(), reduction="none").view_as(weights) * weights
    return token_logps.sum(-1), (logits.detach().mean(-1) * weights).sum(-1), weights.sum(-1)


def pair_loss(model, tensors: dict, reference, *, split_head: bool, dc):
    """(sum of the DPO losses of the batch's pairs, STATISTICS sums) given reference log-prob sums."""
    logps, logit_sums, counts = sequence_logps(model, tensors, split_head)
    if uses_mean_logps(dc.loss_type, dc.average_log_prob):
        logps, reference = logps / counts, reference / counts
    b = logps.shape[0] // 2
    losses, chosen_rewards, rejected_rewards = dpo_losses(logps[:b], logps[b:], reference[:b], reference[b:], beta=dc.beta,
                                                          loss_type=dc.loss_type, label_smoothing=dc.label_smoothing, xp=torch)
    sums = pair_statistics(*(t.detach() for t in (losses, chosen_rewards, rejected_rewards, logps[:b], logps[b:], logit_sums)),
                           counts, xp=torch)
    return losses.sum(), sums


def micro_step(model, tensors: dict, reference, *, split_head: bool, dc, device) -> torch.Tensor:
    """Forward and backward of one micro-batch. Adds the gradient of its pair losses' *sum* to
    .grad, so micro-batches add up to one big batch; returns the STATISTICS sums (detached)."""
    with torch_model.autocast(device):
        loss_sum, sums = pair_loss(model, tensors, reference, split_head=split_head, dc=dc)
    loss_sum.backward()
    return sums


@torch.no_grad()
def reference_logps(model, tensors: dict, *, split_head: bool) -> torch.Tensor:
    """Reference log-prob sums [2B] of a pair batch, from the base model (adapter off)."""
    with lora.adapter_off(model):
        return sequence_logps(model, tensors, split_head)[0]


def batch_tensors(batch, pad_id: int, shared: bool, device, pad_to_multiple: int | None = None) -> dict:
    """A pair batch's rows as the step takes them (mlxft.data.shared_prompt.pair_inputs)."""
    multiple = pad_to_multiple or (SHARED_PROMPT_PAD_MULTIPLE if shared else PAD_MULTIPLE)
    arrays = pair_inputs(batch, pad_id, shared=shared, pad_to_multiple=multiple, few_widths=SHARED_PROMPT_FEW_WIDTHS)
    return dict(zip(arrays, torch_model.to_device(device, *arrays.values())))


# --- the cached reference --------------------------------------------------------------------------

@torch.no_grad()
def _score_pairs(model, pairs, tensors_of, pad_id: int, split_head: bool, batch_size: int, device) -> tuple[np.ndarray, np.ndarray]:
    """Log-prob sums of every pair's chosen and rejected answer under the model as it is now."""
    chosen, rejected = np.zeros(len(pairs), np.float32), np.zeros(len(pairs), np.float32)
    was_training = model.training
    model.eval()
    for batch in iterate_pair_batches(pairs, batch_size, pad_id, shuffle=False, pad_to_multiple=PAD_MULTIPLE):
        with torch_model.autocast(device):
            logps = sequence_logps(model, tensors_of(batch), split_head)[0].float().cpu().numpy()
        chosen[batch.index], rejected[batch.index] = logps[: batch.pairs], logps[batch.pairs :]
    model.train(was_training)
    return chosen, rejected
