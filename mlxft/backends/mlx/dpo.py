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

from functools import partial

import mlx.core as mx
import mlx.optimizers as optim
import numpy as np

from mlxft import backends, driver
from mlxft.adapters import attach_adapter
from mlxft.backends.mlx import PAD_MULTIPLE, checkpoint, lora, steps
from mlxft.backends.mlx import model as mlx_model
from mlxft.backends.mlx.generate import generate_answer
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
    backend = backends.get("mlx")

    # --- setup -----------------------------------------------------------------------------
    mx.random.seed(tc.seed)
    mlx_model.configure_memory()
    splits, asked = load_pair_data(config, adapter)  # rows first: a data mistake should not wait for a model

    model, tokenizer, folder = mlx_model.load(config.model.name, quantize=config.model.quantize,
                                              trust_remote_code=config.model.trust_remote_code)
    split_head = mlx_model.can_split_head(model, folder)
    pad_id = pad_id_of(tokenizer)
    # Not with gradient checkpointing: mlx-lm's recomputes each block during the backward pass,
    # after the forward has put back the rotary embeddings the shared layout swaps for its length.
    shared = dc.share_prompt and mlx_model.can_share_prompts(model, folder) and not tc.grad_checkpoint

    def arrays_of(pairs) -> dict:
        return steps.pair_arrays(pairs.batch, pad_id, shared)

    train_set, valid_set, truncated_pairs = encode_pairs(splits, tokenizer, config, echo)

    # --- reference ---------------------------------------------------------------------------
    cache, reference_name = prepare_reference(
        run, config, adapter=adapter, model_folder=folder, train_set=train_set, valid_set=valid_set, resume=resume,
        score=lambda pairs: steps.score_pairs(model, pairs, arrays_of, pad_id, split_head, ec.batch_size),
        carry_adapter=lambda path: attach_adapter(lora, model, path),
        drop_adapter=lambda: lora.remove_lora(model), echo=echo, write=world.main)

    # --- policy ----------------------------------------------------------------------------
    mx.random.seed(tc.seed)  # a new adapter's A is the same whether or not the reference was scored first
    spec = build_policy(backend, model, config, folder, start_from=run.checkpoint_dir / "weights" if resume else adapter)
    trainable, line = describe_policy(backend, model, folder, spec, config)
    echo(describe_dpo(line, dc, reference_name, shared))
    echo(f"run folder: {run.folder}")

    # --- optimizer and step ----------------------------------------------------------------------
    optimizer = optim.AdamW(learning_rate=tc.learning_rate, weight_decay=tc.weight_decay,
                            bias_correction=tc.bias_correction)
    start = driver.Start()
    if resume:  # before the step is compiled: it must capture the restored optimizer state
        start = driver.Start(*checkpoint.load(run, model, optimizer, config.lora.full_finetune))
    micro_step, update = steps.make_step(model, optimizer, partial(steps.pair_loss, split_head=split_head, dc=dc,
                                                                      chunk=tc.head_chunk),
                                         tc.max_grad_norm)
    reference_step = steps.make_reference_step(model, split_head, tc.head_chunk) if cache is None and needs_reference(dc.loss_type) else None

    def reference_for(pairs, split: str, arrays, rows=None):
        """Reference log-prob sums [2B] of a pair batch, in its row order (chosen, then rejected);
        `rows` maps its pairs' indices to the split's."""
        if cache is not None:
            return mx.array(cached_reference(cache, split, pairs.index if rows is None else rows[pairs.index]))
        if reference_step is None:  # a loss without a reference: never read
            return mx.zeros((2 * pairs.pairs,), mx.float32)
        return reference_step(arrays)

    labels = {"train": pair_labels(splits.train), "valid": pair_labels(splits.valid)}  # KTO's; 1 for every pair

    def inputs_of(pairs) -> tuple:
        arrays = arrays_of(pairs)
        reference = reference_for(pairs, "train", arrays)
        mx.eval(reference)  # the reference forward's activations are freed before the policy's begins
        return arrays, reference, mx.array(labels["train"][pairs.index])

    def validation_sums(pairs, rows) -> np.ndarray:
        arrays = arrays_of(pairs)
        reference = reference_for(pairs, "valid", arrays, rows)
        return np.array(steps.pair_loss(model, arrays, reference, mx.array(labels["valid"][rows[pairs.index]]),
                                        split_head=split_head, dc=dc)[1])

    statistics, summarize = len(statistic_names(dc.loss_type)), summarizer(dc.loss_type)
    trainer = driver.Trainer(
        step=steps.train_step(model, optimizer, micro_step, update, inputs_of, tc.seed, world, statistics),
        validate=driver.pair_validation(model, valid_set, validation_sums, summarize, statistics=statistics,
                                        batch_size=ec.batch_size, pad_id=pad_id, pad_multiple=PAD_MULTIPLE, world=world),
        summarize=summarize,
        save_weights=lambda where: checkpoint.save_weights(where, model, spec, config, folder),
        save_checkpoint=lambda *state: checkpoint.save(run, model, optimizer, spec, config, folder, *state),
        memory=mlx_model.memory_meter(),
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
        run, config, fitted, trainer, method="dpo", backend="mlx", device=str(mx.default_device()), model=str(folder),
        trainable=trainable, setup={"reference": reference_name, "loss_type": dc.loss_type, "beta": dc.beta},
        data={"train_pairs": len(train_set), "valid_pairs": len(valid_set), "truncated_pairs": truncated_pairs,
              "shared_prompts": shared},
        outputs={"saved_check": saved_check, "before_answers": before_answers, "comparison": comparison})
