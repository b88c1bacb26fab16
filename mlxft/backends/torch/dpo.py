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

import numpy as np
import torch

from mlxft import backends, driver
from mlxft.adapters import attach_adapter
from mlxft.backends.torch import PAD_MULTIPLE, checkpoint, lora, steps
from mlxft.backends.torch import model as torch_model
from mlxft.backends.torch.adamw import MLXAdamW
from mlxft.backends.torch.generate import generate_answer
from mlxft.config import RunConfig
from mlxft.data.batching import iterate_pair_batches
from mlxft.distributed import World
from mlxft.dpo_common import (
    answer_all,
    cached_reference,
    compare_after,
    compare_rows,
    describe_dpo,
    encode_pairs,
    load_pair_data,
    pair_labels,
    prepare_reference,
)
from mlxft.dpo_loss import needs_reference, statistic_names, summarizer
from mlxft.model_files import pad_id as pad_id_of
from mlxft.policy import build_policy, describe_policy
from mlxft.runs import Run
from mlxft.saved_check import check_saved_adapter, probe_ids


def train(config: RunConfig, run: Run, *, resume: bool = False, adapter: str | None = None, echo=print,
          world: World = World()) -> dict:
    """Train as `config` says, writing into `run`; returns the summary (also in summary.json), or {}
    on a rank other than 0 of several (mlxft.distributed)."""
    tc, ec, dc = config.train, config.eval, config.dpo
    backend = backends.get("torch")

    # --- setup -----------------------------------------------------------------------------
    device = torch_model.pick_device()
    splits, asked = load_pair_data(config, adapter)  # rows first: a data mistake should not wait for a model

    model, tokenizer, folder = torch_model.load(config.model.name, quantize=config.model.quantize,
                                                trust_remote_code=config.model.trust_remote_code, device=device)
    split_head = torch_model.can_split_head(model, folder)
    pad_id = pad_id_of(tokenizer)
    shared = dc.share_prompt and torch_model.can_share_prompts(model, folder)

    def tensors_of(pairs) -> dict:
        return steps.pair_tensors(pairs.batch, pad_id, shared, device)

    train_set, valid_set, truncated_pairs = encode_pairs(splits, tokenizer, config, echo)

    # --- reference ---------------------------------------------------------------------------
    cache, reference_name = prepare_reference(
        run, config, adapter=adapter, model_folder=folder, train_set=train_set, valid_set=valid_set, resume=resume,
        score=lambda pairs: steps.score_pairs(model, pairs, tensors_of, pad_id, split_head, ec.batch_size, device),
        carry_adapter=lambda path: attach_adapter(lora, model, path),
        drop_adapter=lambda: lora.remove_lora(model), echo=echo, write=world.main)

    # --- policy ----------------------------------------------------------------------------
    torch.manual_seed(tc.seed)  # a new adapter's A is the same whether or not the reference was scored first
    spec = build_policy(backend, model, config, folder, start_from=run.checkpoint_dir / "weights" if resume else adapter)
    trainable, line = describe_policy(backend, model, folder, spec, config, where=f" on {device}")
    echo(describe_dpo(line, dc, reference_name, shared))
    echo(f"run folder: {run.folder}")

    # --- optimizer and step ----------------------------------------------------------------------
    named = {name: p for name, p in model.named_parameters() if p.requires_grad}
    optimizer = MLXAdamW(list(named.values()), lr=tc.learning_rate, weight_decay=tc.weight_decay,
                         bias_correction=tc.bias_correction)
    start = driver.Start()
    if resume:
        start = driver.Start(*checkpoint.load(run, model, optimizer, named, config.lora.full_finetune,
                                              config.model.trust_remote_code))

    def reference_for(pairs, split: str, tensors, rows=None) -> torch.Tensor:
        """Reference log-prob sums [2B] of a pair batch, in its row order (chosen, then rejected);
        `rows` maps its pairs' indices to the split's."""
        if cache is not None:
            return torch.from_numpy(cached_reference(cache, split, pairs.index if rows is None else rows[pairs.index])).to(device)
        if not needs_reference(dc.loss_type):  # never read
            return torch.zeros(2 * pairs.pairs, device=device)
        with torch_model.autocast(device):
            return steps.reference_logps(model, tensors, split_head=split_head, chunk=tc.head_chunk)

    labels = {"train": pair_labels(splits.train), "valid": pair_labels(splits.valid)}  # KTO's; 1 for every pair

    def loss_of(pairs):
        tensors = tensors_of(pairs)
        reference = reference_for(pairs, "train", tensors)  # no_grad: nothing of it is kept for the backward
        with torch_model.autocast(device):
            return steps.pair_loss(model, tensors, reference, torch.from_numpy(labels["train"][pairs.index]).to(device),
                                   split_head=split_head, dc=dc, chunk=tc.head_chunk)

    @torch.no_grad()
    def validation_sums(pairs, rows) -> np.ndarray:
        tensors = tensors_of(pairs)
        reference = reference_for(pairs, "valid", tensors, rows)
        valid_labels = torch.from_numpy(labels["valid"][rows[pairs.index]]).to(device)
        with torch_model.autocast(device):
            return steps.pair_loss(model, tensors, reference, valid_labels, split_head=split_head, dc=dc)[1].cpu().numpy()

    statistics, summarize = len(statistic_names(dc.loss_type)), summarizer(dc.loss_type)
    trainer = driver.Trainer(
        step=steps.train_step(optimizer, loss_of, seed=tc.seed, max_grad_norm=tc.max_grad_norm, world=world,
                              statistics=statistics, names=list(named)),
        validate=driver.pair_validation(model, valid_set, validation_sums, summarize, statistics=statistics,
                                        batch_size=ec.batch_size, pad_id=pad_id, pad_multiple=PAD_MULTIPLE, world=world),
        summarize=summarize,
        save_weights=lambda where: checkpoint.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: checkpoint.save(run, model, optimizer, named, spec, config, folder, *state),
        memory=torch_model.memory_meter(device),
    )

    # --- loop ----------------------------------------------------------------------------------
    prompts = compare_rows(asked, splits, ec)
    model.train()
    fitted = driver.fit(run, config, trainer, train_set, start=start, iterate=iterate_pair_batches, pad_id=pad_id,
                        pad_multiple=PAD_MULTIPLE, echo=echo,
                        baseline=lambda: {"before_answers": answer_all(generate_answer, model, tokenizer, prompts, splits, config)},
                        world=world)
    if not world.main:
        return {}

    # --- save ----------------------------------------------------------------------------------
    saved_check = None if config.lora.full_finetune else check_saved_adapter(
        lora, model, run.folder / "last", probe_ids(valid_set or train_set), echo)

    # --- before / after answers ----------------------------------------------------------------
    before_answers, comparison = compare_after(run, config, fitted, generate_answer, model, tokenizer, prompts, splits, adapter)
    return driver.summarize_run(
        run, config, fitted, trainer, method="dpo", backend="torch", device=str(device), model=str(folder),
        trainable=trainable, setup={"reference": reference_name, "loss_type": dc.loss_type, "beta": dc.beta},
        data={"train_pairs": len(train_set), "valid_pairs": len(valid_set), "truncated_pairs": truncated_pairs,
              "shared_prompts": shared},
        outputs={"saved_check": saved_check, "before_answers": before_answers, "comparison": comparison})
